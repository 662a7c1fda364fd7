"""Ingest: InstaCities1M folders, a manifest, an Instagram account export or a folder of
images -> <lake>/tables/posts (+ rejected).

Decisions (which records to reject, which are duplicate posts) are made on metadata
only: file listings and object sizes. Image bytes are read once, in a final pass that
never shuffles them, so ingest costs one read of the images plus one write.
"""

from __future__ import annotations

import math
from typing import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core import storage
from core import progress
from core.config import Config
from core.lake import Lake, Summary, begin_output, write_rejected, write_table
from core.schemas import POSTS, TABLES, CaptionStatus
from sparkml.ingest.archive import ingest_archive
from sparkml.ingest.instacities import ingest_instacities
from sparkml.ingest.manifest import ingest_manifest
from sparkml.ingest.posts import STAGE, caption_status, decode_caption


# ---------------------------------------------------------------- reading the bytes (every layout)


def read_posts(spark: SparkSession, todo: DataFrame, cfg: Config) -> DataFrame:
    """Rows with image_uri (+ caption text or caption_uri) -> POSTS rows with the image bytes.

    Tasks are balanced by image bytes, and each reads with a thread pool, so object-store
    latency overlaps; no image bytes are shuffled."""
    total, rows = todo.agg(F.sum("image_size"), F.count("*")).first()
    total = total or 0
    parts = max(spark.sparkContext.defaultParallelism, math.ceil(total / (cfg.ingest.partition_mb << 20)))
    threads, endpoint, region = cfg.ingest.read_threads, cfg.s3.endpoint, cfg.s3.region
    schema = TABLES["posts"].arrow

    acc = progress.counter(spark, rows)

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            acc.add(b.num_rows)
            uris = b.column("_read").to_pylist()
            blobs = storage.read_many(uris, threads, endpoint, region)
            for u, blob in zip(uris, blobs):
                if blob is None:
                    raise FileNotFoundError(f"{u} disappeared while ingest was reading it; re-run ingest")
            cap_uris = b.column("caption_uri").to_pylist()
            texts = b.column("caption").to_pylist()
            if any(cap_uris):
                caps = [decode_caption(r) for r in storage.read_many(cap_uris, threads, endpoint, region)]
            else:  # manifest text, its invalid UTF-8 already replaced (and flagged) by the reader
                bad = b.column("_caption_not_utf8").to_pylist()
                caps = [(t, CaptionStatus.NOT_UTF8.value if x and caption_status(t) == CaptionStatus.OK.value
                         else caption_status(t)) for t, x in zip(texts, bad)]
            yield pa.RecordBatch.from_arrays([
                b.column("post_id"), b.column("city"), b.column("split"),
                pa.array([c[0] for c in caps], pa.string()), pa.array([c[1] for c in caps], pa.string()),
                b.column("user_id"), b.column("likes"), b.column("followers"), b.column("posted_at"),
                b.column("image_uri"), pa.array(blobs, pa.binary()), pa.array([len(x) for x in blobs], pa.int64()),
            ], schema=schema)

    cols = ["post_id", "city", "split", "caption", "caption_uri", "user_id", "likes", "followers",
            "posted_at", "image_uri"]
    # fetched URLs are read from the lake's cache; image_uri keeps the URL
    read_from = F.coalesce("read_uri", "image_uri") if "read_uri" in todo.columns else F.col("image_uri")
    not_utf8 = F.col("_caption_not_utf8") if "_caption_not_utf8" in todo.columns else F.lit(False)
    return todo.select(*cols, read_from.alias("_read"), not_utf8.alias("_caption_not_utf8")) \
        .repartition(parts, "post_id").mapInArrow(read, POSTS)


# ---------------------------------------------------------------- the stage


def plan(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame, dict]:
    """(todo, rejects, input_keys, extra) of cfg.source in its layout: what read_posts reads."""
    if cfg.source.layout in ("instacities", "classes"):
        todo, rejects, inputs = ingest_instacities(spark, cfg)
        return todo, rejects, inputs, {"flags": {}}
    if cfg.source.layout == "manifest":
        return ingest_manifest(spark, cfg)
    return ingest_archive(spark, cfg)


def ingest(spark: SparkSession, cfg: Config) -> Summary:
    """Read the configured source and write <lake>/tables/posts and the stage's rejects."""
    lake = Lake(cfg.lake)
    out = lake.table("posts")
    begin_output(spark, out)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.ingest.batch_rows))
    todo, rejects, inputs, extra = plan(spark, cfg)
    rejected = write_rejected(spark, lake, STAGE, rejects)
    write_table(read_posts(spark, todo, cfg), lake, "posts")
    written = spark.read.parquet(out)
    status = {r["caption_status"]: int(r["count"]) for r in written.groupBy("caption_status").count().collect()}
    return Summary(
        stage=STAGE, input_rows=inputs.count(), output_rows=sum(status.values()), rejected=rejected, output=out,
        extra={"source": storage.qualify(cfg.source.path), "layout": cfg.source.layout,
               "caption_status": status, **extra},
    )
