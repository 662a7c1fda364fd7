"""Text-to-image retrieval in topic space, and the original's evaluation.

A query is preprocessed like a caption; each word's vector is p(word | topic) over the
topics (gensim `get_term_topics` semantics, 0 for a word the model does not know); the
query vector is their mean. Images are ranked by dot product (or cosine / euclidean) with a
block-wise top-k: every Arrow batch of embeddings keeps its own k best per query, the driver
merges those, so 150K+ images and many queries never meet in one matrix.

Metrics (the original's): precision at 100, and non-interpolated average precision over the
full ranking, relevant = a test image of the query's city.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from core.schemas import TABLES
from sparkml.captions.text import preprocess


class UnknownQuery(ValueError):
    """A query none of whose words the model knows: it would rank every image equally."""


def embed_query(text: str, lda) -> np.ndarray:
    """Mean over the query's words of p(word | topic); unknown words count as zero vectors."""
    words = preprocess(text)
    if not words:
        raise UnknownQuery(f"query {text!r} has no words left after preprocessing")
    ids = [lda.id2word.token2id.get(w) for w in words]
    if all(i is None for i in ids):
        raise UnknownQuery(f"no word of query {text!r} ({', '.join(words)}) is in the topic model's vocabulary")
    topics = lda.get_topics()  # topics x vocabulary, rows sum to 1
    return np.mean([topics[:, i] if i is not None else np.zeros(topics.shape[0]) for i in ids], axis=0)


def scores(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """(Q, D) x (N, D) -> (Q, N), higher is better."""
    q, v = np.asarray(queries, np.float64), np.asarray(vectors, np.float64)
    if metric == "dot":
        return q @ v.T
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return qn @ vn.T
    if metric == "euclidean":
        return -np.sqrt(np.maximum((q ** 2).sum(1)[:, None] - 2 * q @ v.T + (v ** 2).sum(1)[None, :], 0))
    raise ValueError(f"unknown metric {metric!r}")


def top_k_block(post_ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """The k best (query index, post_id, score) of one block, ties broken by post_id."""
    s = scores(queries, vectors, metric)
    out = []
    for qi, row in enumerate(s):
        if len(row) > k:  # everything tied with the k-th best is a candidate; post_id decides among ties
            kth = np.partition(row, len(row) - k)[len(row) - k]
            cand = np.flatnonzero(row >= kth)
        else:
            cand = np.arange(len(row))
        best = sorted(cand.tolist(), key=lambda j: (-row[j], post_ids[j]))[:k]
        out += [(qi, post_ids[j], float(row[j])) for j in best]
    return out


def top_k_batch(batch: pa.RecordBatch, column: str, queries: np.ndarray, k: int, metric: str) -> pa.RecordBatch:
    vectors = np.asarray(batch.column(column).to_pylist(), np.float64)
    rows = top_k_block(batch.column("post_id").to_pylist(), vectors, queries, k, metric) if len(vectors) else []
    return pa.RecordBatch.from_pydict({"query": [r[0] for r in rows], "post_id": [r[1] for r in rows],
                                       "score": [r[2] for r in rows]},
                                      schema=pa.schema([("query", pa.int32()), ("post_id", pa.string()),
                                                        ("score", pa.float64())]))


def rank(embeddings, column: str, queries: np.ndarray, k: int, metric: str) -> list[list[tuple[str, float]]]:
    """Per query, the k best (post_id, score) over a Spark DataFrame of embeddings."""
    cand = embeddings.select("post_id", column).mapInArrow(
        lambda bs: (top_k_batch(b, column, queries, k, metric) for b in bs),
        "query int, post_id string, score double").collect()
    per: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
    for r in cand:
        per[r["query"]].append((r["post_id"], r["score"]))
    return [sorted(p, key=lambda x: (-x[1], x[0]))[:k] for p in per]


# ---------------------------------------------------------------- metrics


def precision_at_k(relevant_in_rank_order: np.ndarray, k: int) -> float:
    """Fraction of the first k that are relevant (k counts even if fewer are ranked)."""
    return float(np.sum(np.asarray(relevant_in_rank_order, bool)[:k])) / k


def average_precision(relevant_in_rank_order: np.ndarray) -> float:
    """Non-interpolated AP over the full ranking (scikit-learn's, the ranking given by position):
    the mean of precision@rank at each relevant item; 0 when nothing is relevant."""
    from sklearn.metrics import average_precision_score

    rel = np.asarray(relevant_in_rank_order, bool)
    if not rel.any():
        return 0.0
    return float(average_precision_score(rel, -np.arange(len(rel), dtype=np.float64)))


def order(post_ids: list[str], s: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties by post_id (deterministic)."""
    return np.array(sorted(range(len(post_ids)), key=lambda i: (-s[i], post_ids[i])), dtype=np.int64)


# ---------------------------------------------------------------- contact sheet


def contact_sheet(title: str, tiles: list[tuple[str, float, bytes | None]], cols: int = 5, side: int = 150) -> bytes:
    """A PNG grid of the ranked images, each captioned with rank, post_id and score."""
    rows = max(1, -(-len(tiles) // cols))
    sheet = Image.new("RGB", (cols * side, 28 + rows * (side + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title, fill="black")
    for n, (pid, score, data) in enumerate(tiles):
        x, y = (n % cols) * side, 28 + (n // cols) * (side + 16)
        if data:
            sheet.paste(Image.open(io.BytesIO(data)).convert("RGB").resize((side - 4, side - 4)), (x + 2, y))
        draw.text((x + 4, y + side - 2), f"{n + 1}. {pid} {score:.3g}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def jpegs(images, ids) -> dict[str, bytes]:
    """post_id -> image bytes of the given posts, from a DataFrame with post_id and image (an
    images table): what the contact sheets show, collected to the driver."""
    from pyspark.sql import functions as F

    ids = sorted(set(ids))
    if not ids:
        return {}
    return {r["post_id"]: bytes(r["image"]) for r in images.where(F.col("post_id").isin(ids))
            .select("post_id", "image").collect()}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"


# ---------------------------------------------------------------- the stages


def _embeddings(spark, cfg, lake):
    """The configured embeddings table, restricted to unique images (what can be shown)."""
    from pyspark.sql import functions as F

    from core.lake import read_complete, read_table
    from sparkml.images.dedup import unique_images

    r = cfg.retrieval
    if r.embeddings in TABLES:
        emb = read_table(spark, lake, r.embeddings)
    else:
        uri = r.embeddings if ("/" in r.embeddings or ":" in r.embeddings) else lake.table(r.embeddings)
        emb = read_complete(spark, uri, "run the job that writes it (retrieval.embeddings)")
    if r.column not in emb.columns:
        from core.config import ConfigError

        raise ConfigError(f"retrieval.column: {uri} has no column {r.column!r} (it has {', '.join(emb.columns)})")
    images = unique_images(spark, lake).select("post_id")
    return emb.select("post_id", F.col(r.column).alias("vector")).join(images, "post_id", "left_semi")


def _query_vectors(texts: list[str], lda) -> np.ndarray:
    from core.config import ConfigError

    try:
        return np.stack([embed_query(t, lda) for t in texts])
    except UnknownQuery as e:
        raise ConfigError(str(e)) from None


def retrieve(spark, cfg, queries: list[str], k: int | None = None):
    """Rank unique images for each query; <lake>/tables/retrieval + reports/retrieval/<query>.png."""
    from core import storage
    from core.lake import Lake, Summary, begin_output, write_table
    from sparkml.captions.topics import load_lda

    lake = Lake(cfg.lake)
    k = k or cfg.retrieval.k
    out = lake.table("retrieval")
    begin_output(spark, out)
    lda = load_lda(spark, lake, cfg)
    qv = _query_vectors(queries, lda)
    emb = _embeddings(spark, cfg, lake)
    ranked = rank(emb, "vector", qv, k, cfg.retrieval.metric)
    rows = [(q, n + 1, pid, s) for q, hits in zip(queries, ranked) for n, (pid, s) in enumerate(hits)]
    write_table(spark.createDataFrame(rows, TABLES["retrieval"].schema).repartition(1), lake, "retrieval")
    images = jpegs(spark.read.parquet(lake.table("images")), [r[2] for r in rows])
    sheets = []
    for q, hits in zip(queries, ranked):
        uri = f"{lake.report('retrieval')}/{slug(q)}.png"
        storage.write_bytes(spark, uri, contact_sheet(f"{q!r}: top {len(hits)} by {cfg.retrieval.metric}",
                                                      [(p, s, images.get(p)) for p, s in hits]))
        sheets.append(uri)
        print(f"{q!r}: " + ", ".join(f"{p} ({s:.3g})" for p, s in hits[:10]) + (" ..." if len(hits) > 10 else ""))
    return Summary(stage="retrieve", input_rows=len(queries), output_rows=len(queries), output=out,
                   extra={"k": k, "metric": cfg.retrieval.metric, "contact_sheets": sheets,
                          "embeddings": cfg.retrieval.embeddings})


PUBLISHED = {"mean_precision_at_100": 90.2, "mean_average_precision": 18.96}
# The original's example queries (Gomez et al., text-to-image retrieval figures).
EXAMPLE_QUERIES = ("rain", "snow", "skyline night", "car yellow", "sunrise beach", "woman bag")


def _examples(spark, cfg, lake, lda, k: int = 10) -> tuple[dict[str, list], list[str]]:
    """The example queries' top k among the unique images ({query: [[post_id, score], ...]}),
    and the queries with no word in this run's LDA vocabulary."""
    known, skipped = [], []
    for q in EXAMPLE_QUERIES:
        try:
            known.append((q, embed_query(q, lda)))
        except UnknownQuery:
            skipped.append(q)
    ranked = rank(_embeddings(spark, cfg, lake), "vector", np.stack([v for _, v in known]), k,
                  cfg.retrieval.metric) if known else []
    return {q: [[p, s] for p, s in hits] for (q, _), hits in zip(known, ranked)}, skipped


def evaluate(spark, cfg):
    """Per city: query = the city name, relevant = a test image of that city; P@100 and AP."""
    import json

    from pyspark.sql import functions as F

    from core import storage
    from core.lake import Lake, Summary, begin_output, read_table
    from core.splits import assign_split
    from sparkml.captions.topics import load_lda

    lake = Lake(cfg.lake)
    out = lake.report("retrieval_eval")
    begin_output(spark, out)
    d = cfg.dataset
    posts = read_table(spark, lake, "posts").select("post_id", "city", "split")
    test = assign_split(posts, d.train, d.val, d.respect_source_split).where(F.col("split") == "test") \
        .where(F.col("city").isNotNull())
    emb = _embeddings(spark, cfg, lake).join(test.select("post_id", "city"), "post_id")
    cities = sorted(r["city"] for r in test.select("city").distinct().collect())
    lda = load_lda(spark, lake, cfg)
    vocab = lda.id2word.token2id
    known = [c for c in cities if any(w in vocab for w in preprocess(c))]
    qv = _query_vectors(known, lda) if known else np.zeros((0, lda.num_topics))
    metric = cfg.retrieval.metric

    def score_batch(batch):
        v = np.asarray(batch.column("vector").to_pylist(), np.float64)
        s = scores(qv, v, metric) if len(v) else np.zeros((len(known), 0))
        return pa.RecordBatch.from_arrays([batch.column("post_id"), batch.column("city"),
                                           pa.array(list(s.T), pa.list_(pa.float64()))],
                                          names=["post_id", "city", "s"])

    got = emb.mapInArrow(lambda bs: (score_batch(b) for b in bs), "post_id string, city string, s array<double>") \
        .collect()
    ids = [r["post_id"] for r in got]
    city_of = np.array([r["city"] for r in got])
    mat = np.array([r["s"] for r in got]).reshape(len(got), len(known))
    per_city = {}
    for qi, city in enumerate(known):
        o = order(ids, mat[:, qi])
        rel = city_of[o] == city
        per_city[city] = {"precision_at_100": 100 * precision_at_k(rel, 100), "average_precision": 100 * average_precision(rel),
                          "relevant": int(rel.sum()), "chance_precision": 100 * float(rel.mean()) if len(rel) else 0.0,
                          "max_precision_at_100": 100 * min(int(rel.sum()), 100) / 100}
    mean = {"mean_precision_at_100": float(np.mean([v["precision_at_100"] for v in per_city.values()])) if per_city else None,
            "mean_average_precision": float(np.mean([v["average_precision"] for v in per_city.values()])) if per_city else None}
    examples, unknown = _examples(spark, cfg, lake, lda)
    report = {"test_images": len(ids), "metric": metric, "embeddings": cfg.retrieval.embeddings, "per_city": per_city,
              "mean": mean, "published": PUBLISHED, "cities_not_in_vocabulary": sorted(set(cities) - set(known)),
              "examples": examples, "examples_not_in_vocabulary": unknown}
    lines = ["| city | P@100 (%) | AP (%) | relevant / test images | chance (%) | best possible P@100 (%) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {v['precision_at_100']:.1f} | {v['average_precision']:.2f} | {v['relevant']} / {len(ids)} | "
              f"{v['chance_precision']:.1f} | {v['max_precision_at_100']:.0f} |" for c, v in per_city.items()]
    if per_city:
        lines.append(f"| **mean** | **{mean['mean_precision_at_100']:.1f}** | **{mean['mean_average_precision']:.2f}** "
                     "| | | |")
    lines.append(f"| published (InstaCities1M, GoogLeNet regressor) | {PUBLISHED['mean_precision_at_100']} | "
                 f"{PUBLISHED['mean_average_precision']} | | | |")
    md = (f"Text-to-image retrieval, query = city name, embeddings `{cfg.retrieval.embeddings}` ({metric}), "
          f"{len(ids)} test images.\n\n" + "\n".join(lines) + "\n")
    storage.write_bytes(spark, f"{out}/metrics.json", json.dumps(report, indent=1).encode())
    storage.write_bytes(spark, f"{out}/metrics.md", md.encode())
    print(md)
    return Summary(stage="evaluate_retrieval", input_rows=len(ids), output_rows=len(ids), output=out,
                   extra={"mean": mean, "per_city": per_city, "published": PUBLISHED})
