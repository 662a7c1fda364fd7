"""Caption benchmarks (issue 5).

1. Preprocessing, captions/s per core: `sparkml.captions.text.preprocess` (compiled regexes, memoised
   stemmer) against the original's way, a plain Python loop of the same rules one character
   and one stem call at a time (`reference_preprocess`), same captions, same run; outputs
   must be identical. Then the Spark path (tokenize over Arrow batches) with local[1] and
   local[2].
2. LDA training: docs/s and peak memory of gensim LdaModel streaming bags of words from
   Parquet (our train_lda) against the same LdaModel fed an in-memory corpus list (the
   original's way), at two corpus sizes 10x apart, each in its own process (peak RSS of
   that process).

Captions: the sample generator's (city and topic words, hashtags, fillers, stop words, URLs
and emoji extras) with a Zipfian tail of rare made-up words added, so the vocabulary has
the long tail real captions have. LDA corpora: bags of words drawn from a Zipfian 20,000-word
vocabulary, 12 tokens a caption on average.

    .venv/bin/python bench/captions.py [--captions 50000] [--docs 20000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import CACHE, ROOT, header, run_python, single_core

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def captions(n: int, seed: int = 0) -> list[str]:
    from core.schemas import CITIES
    from sparkml.sample.make_sample import TOPICS, caption_for

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ta", "ren", "su", "vo", "zed", "pa", "qui", "ling", "dor"]
    rare = ["".join(rng.choice(syll, int(rng.integers(2, 5)))) + rng.choice(["", "s", "ing", "ed"]) for _ in range(20000)]
    zipf = rng.zipf(1.3, size=n * 3)
    out = []
    for i in range(n):
        text = caption_for(CITIES[i % 10], list(rng.choice(TOPICS, 2, replace=False)), rng)
        extra = [rare[(z - 1) % len(rare)] for z in zipf[3 * i:3 * i + int(rng.integers(0, 4))]]
        out.append(text + (" " + " ".join(("#" if rng.random() < .3 else "") + w for w in extra) if extra else ""))
    return out


def bench_preprocess(texts: list[str]) -> dict:
    from sparkml.captions import text

    single_core()
    t0 = time.perf_counter()
    ref = [text.reference_preprocess(c) for c in texts]
    t_ref = time.perf_counter() - t0
    text.stem.cache_clear()  # ours starts cold too
    t0 = time.perf_counter()
    ours = [text.preprocess(c) for c in texts]
    t_ours = time.perf_counter() - t0
    assert ours == ref, "preprocess differs from the original's rules"
    row = {"captions": len(texts), "baseline_per_s": len(texts) / t_ref, "ours_per_s": len(texts) / t_ours,
           "ratio": t_ref / t_ours, "identical": True, "distinct_tokens": len({t for c in ours for t in c})}
    print(f"preprocess, one core: {len(texts)} captions | original's loop {row['baseline_per_s']:8.0f}/s | "
          f"ours {row['ours_per_s']:8.0f}/s | ratio {row['ratio']:.2f}x | identical output: yes")
    return row


SPARK_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from core.config import load_config
from core.session import get_session
from sparkml.captions.topics import tokenize
cfg = load_config({conf!r}, ["spark.master={master}", "lake=/tmp/unused"])
spark = get_session(cfg)
df = spark.read.parquet({path!r}).repartition({parts}).cache()
df.count()
best = 1e9
for _ in range(3):
    t0 = time.perf_counter()
    tokenize(df).write.format("noop").mode("overwrite").save()
    best = min(best, time.perf_counter() - t0)
print("SECONDS", best)
"""


def bench_spark(texts: list[str]) -> dict:
    path = CACHE / "captions" / f"captions-{len(texts)}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"post_id": [str(i) for i in range(len(texts))], "caption": texts}), path)
    secs = {}
    for master in ("local[1]", "local[2]"):
        code = SPARK_CHILD.format(root=str(ROOT), conf=str(ROOT / "conf" / "local.yaml"), master=master,
                                  path=str(path), parts=8)
        secs[master] = run_python(code, "SECONDS")[0]
    row = {m: len(texts) / s for m, s in secs.items()}
    row["speedup"] = secs["local[1]"] / secs["local[2]"]
    print(f"preprocess on Spark (tokenize, mapInArrow, noop sink, best of 3): local[1] {row['local[1]']:.0f}/s | "
          f"local[2] {row['local[2]']:.0f}/s | speedup {row['speedup']:.2f}x")
    return row


def make_bow(n: int, vocab: int = 20000, seed: int = 0) -> str:
    path = CACHE / "captions" / f"bow-{n}"  # a folder of Parquet files, like tables/bow/split=train
    if not (path / "part-0.parquet").exists():
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        ids, counts = [], []
        for _ in range(n):
            words = (rng.zipf(1.2, size=max(1, int(rng.poisson(12)))) - 1) % vocab
            u, c = np.unique(words, return_counts=True)
            ids.append(u.astype(np.int32).tolist())
            counts.append(c.astype(np.int32).tolist())
        pq.write_table(pa.table({"ids": pa.array(ids, pa.list_(pa.int32())),
                                 "counts": pa.array(counts, pa.list_(pa.int32()))}), path / "part-0.parquet",
                 row_group_size=4096)
    return str(path)


LDA_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from gensim.corpora import Dictionary
from gensim.models import LdaModel
from sparkml.captions.topics import ParquetCorpus
d = Dictionary(); d.token2id = {{str(i): i for i in range({vocab})}}
corpus = ParquetCorpus({path!r})
if {in_memory}:
    corpus = list(corpus)
t0 = time.perf_counter()
LdaModel(corpus=corpus, id2word=d, num_topics={topics}, chunksize=2000, passes=1, random_state=1, eval_every=None)
print("RESULT", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def bench_lda(n: int, topics: int, vocab: int = 20000) -> list[dict]:
    path = make_bow(n, vocab)
    rows = []
    for in_memory in (True, False):
        code = LDA_CHILD.format(root=str(ROOT), vocab=vocab, path=path, in_memory=in_memory, topics=topics)
        secs, rss = run_python(code, "RESULT", pin_one_core=True)
        rows.append({"docs": n, "in_memory": in_memory, "docs_per_s": n / secs, "peak_rss_mb": rss})
        print(f"LDA {topics} topics, {n:>7} docs, {'in-memory list (original)' if in_memory else 'streaming Parquet (ours)':26s}: "
              f"{n / secs:7.0f} docs/s | peak RSS {rss:7.0f} MB")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=50000)
    ap.add_argument("--docs", type=int, default=20000, help="smaller LDA corpus; the larger is 10x")
    ap.add_argument("--topics", type=int, default=100)
    ap.add_argument("--only", choices=("spark", "lda", "preprocess"), action="append", help="run only these parts")
    args = ap.parse_args()
    parts = set(args.only or ("spark", "lda", "preprocess"))
    header("captions: preprocessing vs the original's loop, LDA streaming vs in-memory")
    texts = captions(args.captions)
    result = {}
    if "spark" in parts:
        result["spark"] = bench_spark(texts)
    if "lda" in parts:
        result["lda"] = bench_lda(args.docs, args.topics) + bench_lda(10 * args.docs, args.topics)
    if "preprocess" in parts:
        result["preprocess"] = bench_preprocess(texts)  # last: pins this process to one core
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
