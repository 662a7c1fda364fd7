"""Caption topics: Spark builds the vocabulary and bags of words, gensim trains LDA streaming
them from Parquet, Spark infers every caption's topic distribution.

    train_lda:    posts -> <lake>/tables/bow (post_id, split, ids, counts; partitioned by split)
                          + <lake>/models/lda/ (gensim LdaModel files, dictionary inside)
    infer_topics: bow + model -> <lake>/tables/topics (post_id, topics float[num_topics])

The original held 800K captions in memory (about 50 GB, a day on 12 threads). Here the
corpus is read one Parquet batch at a time on every pass, so memory does not grow with it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core import storage
from core.config import Config, ConfigError
from core.lake import (Lake, Summary, begin_output, close_output, open_input, read_summary, read_table,
                          write_rejected, write_table)
from core.schemas import TABLES, Reason
from core.splits import assign_split
from sparkml.captions.text import TOKENS_ARROW, tokens_batch


class ParquetCorpus:
    """A re-iterable gensim corpus over Parquet files of (ids, counts): one batch in memory."""

    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None, limit: int | None = None):
        self.files = [u for u, _ in storage.list_files(uri, endpoint, region) if u.endswith(".parquet")]
        self.endpoint, self.region, self.limit = endpoint, region, limit

    def __iter__(self):
        n = 0
        for uri in self.files:
            scheme, path = storage.arrow_path(uri)
            fs = storage.arrow_filesystem(scheme, self.endpoint, self.region)
            with fs.open_input_file(path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=["ids", "counts"]):
                    # Flat values + offsets: one conversion per batch, then plain list slices.
                    ids_col = batch.column("ids")
                    ids, counts = ids_col.flatten().to_pylist(), batch.column("counts").flatten().to_pylist()
                    bounds = ids_col.offsets.to_pylist()
                    bounds = [x - bounds[0] for x in bounds]
                    for a, b in zip(bounds[:-1], bounds[1:]):
                        if self.limit is not None and n >= self.limit:
                            return
                        n += 1
                        yield list(zip(ids[a:b], counts[a:b]))

    def __len__(self):
        """Documents, from the Parquet footers (gensim asks before training): no decode pass."""
        n = 0
        for uri in self.files:
            scheme, path = storage.arrow_path(uri)
            with storage.arrow_filesystem(scheme, self.endpoint, self.region).open_input_file(path) as fh:
                n += pq.ParquetFile(fh).metadata.num_rows
        return n if self.limit is None else min(n, self.limit)


def tokenize(posts: DataFrame) -> DataFrame:
    """post_id + caption -> post_id + tokens, on executors, one Arrow batch at a time."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return posts.select("post_id", "caption").mapInArrow(lambda bs: (tokens_batch(b) for b in bs),
                                                         from_arrow_schema(TOKENS_ARROW))


def vocabulary(tokens: DataFrame, min_count: int, max_size: int | None) -> list[tuple[str, int]]:
    """(token, count) seen more than min_count times over the corpus, most frequent first."""
    counts = (tokens.select(F.explode("tokens").alias("token")).groupBy("token").count()
              .where(F.col("count") > min_count).orderBy(F.desc("count"), "token"))
    if max_size:
        counts = counts.limit(max_size)
    return [(r["token"], int(r["count"])) for r in counts.collect()]


def bags_of_words(spark: SparkSession, tokens: DataFrame, vocab: list[str]) -> DataFrame:
    """post_id -> (ids, counts) over the vocabulary; posts without a vocabulary word get none."""
    index = spark.createDataFrame(list(enumerate(vocab)), "id int, token string")
    words = tokens.select("post_id", F.explode("tokens").alias("token")).join(F.broadcast(index), "token")
    per = words.groupBy("post_id", "id").count()
    return (per.groupBy("post_id")
            .agg(F.array_sort(F.collect_list(F.struct("id", F.col("count").cast("int").alias("n")))).alias("bag"))
            .select("post_id", F.col("bag.id").alias("ids"), F.col("bag.n").alias("counts")))


@contextmanager
def _local_dir():
    path = tempfile.mkdtemp(prefix="lda-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_lda(spark, lake: Lake, cfg: Config):
    """The trained LdaModel from <lake>/models/lda (copied through the cluster's Hadoop FS)."""
    from gensim.models import LdaModel

    uri = lake.model("lda")
    open_input(spark, uri, "run jobs/train_lda.py first")
    with _local_dir() as local:
        storage.download(spark, uri, local)
        return LdaModel.load(os.path.join(local, "lda.model"))  # reads every file now: the folder can go


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_lda(spark: SparkSession, cfg: Config) -> Summary:
    from gensim.corpora import Dictionary
    from gensim.models import CoherenceModel, LdaModel, LdaMulticore

    lake, o = Lake(cfg.lake), cfg.lda
    bow_uri, model_uri = lake.table("bow"), lake.model("lda")
    begin_output(spark, bow_uri)
    begin_output(spark, model_uri)
    posts = read_table(spark, lake, "posts")
    tokens = tokenize(posts).persist()
    vocab = vocabulary(tokens, o.min_count, o.max_vocab)
    if not vocab:
        raise ConfigError(f"lda.min_count {o.min_count}: no token occurs more often than that in the captions")
    words = [t for t, _ in vocab]
    bows = bags_of_words(spark, tokens, words)
    d = cfg.dataset
    split = assign_split(posts.select("post_id", "split"), d.train, d.val, d.respect_source_split)
    # Sorted by post_id, so gensim streams the captions in one order whatever the parallelism
    # (range-partitioned part files are numbered in key order): the same model on every rerun.
    write_table(bows.join(split, "post_id").orderBy("split", "post_id"), lake, "bow", partition_by="split")
    with_bow = spark.read.parquet(bow_uri).select("post_id")
    no_words = tokens.where(F.size("tokens") == 0).select("post_id")
    unknown = tokens.where(F.size("tokens") > 0).select("post_id").join(with_bow, "post_id", "left_anti")
    rejected = write_rejected(spark, lake, "train_lda", no_words.select(
        "post_id", F.lit(Reason.NO_CAPTION_WORDS.value).alias("reason"),
        F.lit("no words left after preprocessing (missing, empty, emoji/URL/stop words only)").alias("detail"))
        .unionByName(unknown.select("post_id", F.lit(Reason.NO_VOCABULARY_WORDS.value).alias("reason"),
                                    F.lit(f"no word seen more than lda.min_count={o.min_count} times").alias("detail"))))
    tokens.unpersist()

    dictionary = Dictionary()
    dictionary.token2id = {w: i for i, w in enumerate(words)}
    dictionary.cfs = {i: c for i, (_, c) in enumerate(vocab)}
    train = ParquetCorpus(f"{bow_uri}/split=train", cfg.s3.endpoint, cfg.s3.region)
    n_train = spark.read.parquet(f"{bow_uri}/split=train").count() if storage.exists(spark, f"{bow_uri}/split=train") else 0
    if n_train == 0:
        raise ConfigError("no training captions with vocabulary words: lower lda.min_count or give more posts")
    rss0, t0 = _peak_rss_mb(), time.perf_counter()
    common = dict(corpus=train, id2word=dictionary, num_topics=o.num_topics, chunksize=o.chunksize,
                  passes=o.passes, random_state=o.seed, eval_every=None)
    lda = LdaMulticore(workers=o.workers, **common) if o.workers > 1 else LdaModel(**common)
    train_s = time.perf_counter() - t0
    held = list(ParquetCorpus(f"{bow_uri}/split=val", cfg.s3.endpoint, cfg.s3.region, limit=o.heldout_docs)) \
        if storage.exists(spark, f"{bow_uri}/split=val") else []
    bound = lda.log_perplexity(held) if held else float("nan")
    sample = list(ParquetCorpus(f"{bow_uri}/split=train", cfg.s3.endpoint, cfg.s3.region, limit=o.heldout_docs))
    coherence = CoherenceModel(model=lda, corpus=sample, dictionary=dictionary, coherence="u_mass").get_coherence()
    with _local_dir() as local:
        lda.save(os.path.join(local, "lda.model"))
        storage.upload(spark, local, model_uri)
    top = {i: [w for w, _ in lda.show_topic(i, 8)] for i in range(min(o.num_topics, 10))}
    n_posts = posts.count()
    summary = Summary(stage="train_lda", input_rows=n_posts, output_rows=with_bow.count(), rejected=rejected,
                      output=model_uri, extra={
                          "vocabulary": len(words), "min_count": o.min_count, "num_topics": o.num_topics,
                          "passes": o.passes, "chunksize": o.chunksize, "workers": o.workers, "train_docs": n_train,
                          "train_seconds": round(train_s, 2), "train_docs_per_s": round(n_train * o.passes / train_s, 1),
                          "heldout_docs": len(held), "heldout_log_perplexity_bound": bound,
                          "heldout_perplexity": 2 ** (-bound) if held else None, "u_mass_coherence": coherence,
                          "peak_rss_mb_driver_python": round(max(rss0, _peak_rss_mb()), 1),
                          "top_words": top, "bow_table": bow_uri})
    # The bow table is this stage's other output: mark it complete too.
    close_output(spark, {"stage": "train_lda", "output": bow_uri, "output_rows": summary.output_rows})
    return summary


def document_seed(seed: int, post_id: str) -> int:
    """A 32-bit seed from the run's lda.seed and the post: the same for a post wherever it runs."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{post_id}".encode(), digest_size=4).digest(), "little")


class _PerDocumentGamma:
    """Stands in for the model's random_state during inference. gensim starts a chunk's
    variational gamma as random_state.gamma(100, 1/100, (len(chunk), k)) from one generator that
    moves on with every batch and task, so a caption's topics depended on what it was batched
    with; here row d comes from a generator seeded by document_seed(seed, post_id[d]). The
    E-step is then per document, so results do not depend on partitioning or batch size."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds

    def gamma(self, shape: float, scale: float, size: tuple[int, int]) -> np.ndarray:
        n, k = size
        assert n == len(self.seeds)
        return np.stack([np.random.RandomState(s).gamma(shape, scale, k) for s in self.seeds]).reshape(n, k)


def infer(lda, post_ids: list[str], docs: list[list[tuple[int, int]]], seed: int) -> np.ndarray:
    """(N, num_topics) float32 topic distributions, each a function of (model, seed, post_id, doc)."""
    state = lda.random_state
    lda.random_state = _PerDocumentGamma([document_seed(seed, p) for p in post_ids])
    try:
        gamma, _ = lda.inference(docs)
    finally:
        lda.random_state = state
    return (gamma / gamma.sum(axis=1, keepdims=True)).astype(np.float32)


def infer_batch(batch: pa.RecordBatch, lda, seed: int) -> pa.RecordBatch:
    """(post_id, ids, counts) -> (post_id, topics): the full distribution, minimum_probability 0."""
    docs = [list(zip(i, c)) for i, c in zip(batch.column("ids").to_pylist(), batch.column("counts").to_pylist())]
    topics = infer(lda, batch.column("post_id").to_pylist(), docs, seed)
    return pa.RecordBatch.from_arrays(
        [batch.column("post_id"), pa.FixedSizeListArray.from_arrays(pa.array(topics.ravel()), lda.num_topics)
         .cast(pa.list_(pa.float32()))], schema=TABLES["topics"].arrow)


def infer_topics(spark: SparkSession, cfg: Config) -> Summary:
    lake = Lake(cfg.lake)
    out = lake.table("topics")
    begin_output(spark, out)
    bow = read_table(spark, lake, "bow").select("post_id", "ids", "counts")
    lda = load_lda(spark, lake, cfg)
    # The model object itself: Spark pickles it once and every Python worker unpickles it once.
    model = spark.sparkContext.broadcast(lda)
    seed = cfg.lda.seed
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.lda.infer_batch_rows))
    topics = bow.mapInArrow(lambda bs: (infer_batch(b, model.value, seed) for b in bs), TABLES["topics"].schema)
    write_table(topics, lake, "topics")
    n = spark.read.parquet(out).count()
    trained = read_summary(spark, lake.model("lda"))
    return Summary(stage="infer_topics", input_rows=bow.count(), output_rows=n, output=out,
                   extra={"num_topics": lda.num_topics, "seed": seed,
                          "posts_without_topics": trained["input_rows"] - trained["output_rows"]})
