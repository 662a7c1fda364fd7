"""The manifest layout: CSV, JSON Lines or Parquet rows (parsed by manifest_files, every record
accounted for) -> post rows; image paths are stat'ed on the executors, http(s) URLs fetched
(sparkml.ingest.fetch) into the lake's cache."""

from __future__ import annotations

import math
import time
from typing import Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core import progress
from core.config import Config, ConfigError
from core.lake import Lake, union_all
from core.schemas import MANIFEST_COLUMNS, Reason
from sparkml.ingest import fetch, manifest_files as manifests
from sparkml.ingest.posts import EPOCH_BOUNDS, URI_SCHEMES, log, rejects_of


MANIFEST_KINDS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet"}


def _manifest_kind(spark: SparkSession, q: str, uri: str, endpoint: str | None,
                   region: str | None) -> tuple[str, list[str]]:
    """(csv, json or parquet; the data files): from the file's extension, or for a folder from
    its data files' (listed once)."""
    if not storage.is_dir(spark, q):
        for ext, kind in MANIFEST_KINDS.items():
            if q.lower().endswith(ext):
                return kind, [q]
        raise ConfigError(f"source.path {uri}: a manifest must be .csv, .jsonl/.json or .parquet (or a folder of them)")
    files = [u for u, _ in storage.list_files(q, endpoint, region) if not u.rsplit("/", 1)[-1].startswith((".", "_"))]
    names = [u.rsplit("/", 1)[-1] for u in files]
    kinds = {MANIFEST_KINDS.get("." + n.rsplit(".", 1)[-1].lower()) if "." in n else None for n in names}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(f"source.path {uri}: a manifest folder must hold files of one kind (.csv, .jsonl/.json "
                          f"or .parquet); found {sorted(set(n.rsplit('.', 1)[-1] for n in names))[:6] or 'none'}")
    return kinds.pop(), files


def read_manifest(spark: SparkSession, uri: str, endpoint: str | None = None, region: str | None = None) -> DataFrame:
    """A CSV, JSON Lines or Parquet manifest (a file or a folder of them) with every known column
    as text (+ _corrupt)."""
    q = storage.qualify(uri)
    if not storage.exists(spark, q):
        raise ConfigError(f"source.path {uri} does not exist")
    kind, files = _manifest_kind(spark, q, uri, endpoint, region)
    try:
        if kind == "json":
            df = manifests.read_json_lines(spark, q)
            columns = list(MANIFEST_COLUMNS)
        elif kind == "csv":
            columns = manifests.header_columns(storage.read_head(files[0], 1 << 16, endpoint, region) or b"")
            df = manifests.read_csv(spark, files, endpoint, region)
        else:
            df = spark.read.parquet(q)
            columns = df.columns
            df = df.select(*[(F.col(c) if c in columns else F.lit(None)).cast("string").alias(c)
                             for c in MANIFEST_COLUMNS], F.lit(None).cast("string").alias("_corrupt"),
                           F.lit(False).alias("_caption_not_utf8"), F.lit(False).alias("_blank"))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - Spark's reader errors (a CSV named .parquet, ...) as one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"source.path {uri}: cannot be read as {kind} ({first})") from None
    missing = [c for c in ("post_id", "image") if c not in columns]
    if missing:
        raise ConfigError(f"manifest {uri} lacks required column(s) {missing}")
    # blank lines carry no record
    return df.where(~F.col("_blank")).drop("_blank")


def _as_long(col: str):
    """A whole number written as text ('12', '12.0', '1e3'); null for '12.7' or 'many' (flagged)."""
    d = F.expr(f"try_cast(trim({col}) as double)")
    return F.when(d == F.floor(d), d.cast("bigint"))


def _as_timestamp(col: str):
    """Epoch seconds or an ISO time; null (and flagged) when it is neither, or when epoch seconds
    fall outside EPOCH_BOUNDS (99999999999999999999 would wrap round to the year 1717)."""
    numeric = F.col(col).rlike(r"^\s*\d+(\.\d+)?\s*$")
    seconds = F.expr(f"try_cast(trim({col}) as double)")
    return F.when(numeric & seconds.between(*EPOCH_BOUNDS), F.timestamp_seconds(seconds)) \
        .when(~numeric, F.expr(f"try_cast(trim({col}) as timestamp)"))


def ingest_manifest(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame, dict]:
    """(todo, rejects, input_keys, extra) for a manifest source."""
    uri = cfg.source.path
    raw = read_manifest(spark, uri, cfg.s3.endpoint, cfg.s3.region).withColumn("_row", F.monotonically_increasing_id())
    # relative image paths resolve against the manifest's folder (the folder itself for a folder of parts)
    base = storage.qualify(uri).rstrip("/") if storage.is_dir(spark, storage.qualify(uri)) else storage.parent(uri)
    return manifest_rows(spark, raw, base, cfg)


def _checked(raw: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(the rows a manifest can use, typed, with flags for values that did not parse; the rows
    it cannot: unparsable, no post_id, no image, a URI scheme nobody reads, with _problem)."""
    blank = lambda c: F.col(c).isNull() | (F.trim(F.col(c)) == "")  # noqa: E731
    problem = (F.when(F.col("_corrupt").isNotNull(), F.concat(F.lit("unparsable row: "), F.substring("_corrupt", 1, 200)))
               .when(blank("post_id"), F.lit("missing post_id"))
               .when(blank("image"), F.lit("missing image"))
               .when(F.trim("image").rlike("^[A-Za-z][A-Za-z0-9+.-]*://")
                     & ~F.lower(F.trim("image")).rlike(f"^({'|'.join(URI_SCHEMES)})://"),
                     F.concat(F.lit("unsupported URI scheme: "), F.substring(F.trim("image"), 1, 200))))
    checked = raw.withColumn("_problem", problem)
    bad = checked.where(F.col("_problem").isNotNull()).withColumn("post_id", F.trim("post_id"))
    rows = checked.where(F.col("_problem").isNull()).select(
        F.trim("post_id").alias("post_id"), F.trim("city").alias("city"),
        F.lit(None).cast("string").alias("split"), "caption", F.lit(None).cast("string").alias("caption_uri"),
        F.trim("user_id").alias("user_id"), _as_long("likes").alias("likes"),
        _as_long("followers").alias("followers"), _as_timestamp("posted_at").alias("posted_at"),
        F.trim("image").alias("image"), "_row",
        (F.col("_caption_not_utf8") if "_caption_not_utf8" in raw.columns else F.lit(False)).alias("_caption_not_utf8"),
        (F.col("likes").isNotNull() & _as_long("likes").isNull()).alias("_bad_likes"),
        (F.col("followers").isNotNull() & _as_long("followers").isNull()).alias("_bad_followers"),
        (F.col("posted_at").isNotNull() & _as_timestamp("posted_at").isNull()).alias("_bad_posted_at"),
    )
    return rows, bad


def _stat_files(rows: DataFrame, base_dir: str, cfg: Config) -> DataFrame:
    """The rows whose image is a file (not an http URL), resolved against base_dir and stat'ed
    on the executors: image_uri, image_size, and _reason / _detail for a missing, empty or
    unusable one."""
    threads, endpoint, region = cfg.ingest.read_threads, cfg.s3.endpoint, cfg.s3.region
    is_url = F.lower(F.col("image")).rlike("^https?://")
    sized_schema = T.StructType([f for f in rows.schema.fields if f.name != "image"] + [
        T.StructField("image_uri", T.StringType()), T.StructField("image_size", T.LongType()),
        T.StructField("_error", T.StringType())])

    def stat(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            uris = [storage.resolve(base_dir, ref) for ref in b.column("image").to_pylist()]
            found = storage.stat_many(uris, threads, endpoint, region)
            cols = [b.column(f.name) for f in sized_schema.fields[:-3]]
            yield pa.RecordBatch.from_arrays(cols + [pa.array(uris, pa.string()),
                                                     pa.array([f[0] for f in found], pa.int64()),
                                                     pa.array([f[1] for f in found], pa.string())],
                                             names=sized_schema.fieldNames())

    return rows.where(~is_url).mapInArrow(stat, sized_schema).select(
        *[c for c in rows.columns if c != "image"], "image_uri", "image_size", F.lit(None).cast("string").alias("read_uri"),
        F.when(F.col("_error").isNotNull(), F.lit(Reason.BAD_MANIFEST_ROW.value))
         .when(F.col("image_size").isNull(), F.lit(Reason.IMAGE_MISSING.value))
         .when(F.col("image_size") == 0, F.lit(Reason.EMPTY_IMAGE.value)).alias("_reason"),
        F.when(F.col("_error").isNotNull(), F.concat(F.lit("unusable image path: "), F.col("_error")))
         .when(F.col("image_size").isNull(), F.concat(F.lit("no file at "), F.col("image_uri")))
         .when(F.col("image_size") == 0, F.col("image_uri")).alias("_detail"))


def manifest_rows(spark: SparkSession, raw: DataFrame, base_dir: str,
                  cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame, dict]:
    """(todo, rejects, input_keys, extra) of manifest-shaped rows (MANIFEST_COLUMNS as text,
    _corrupt, a unique _row), image references resolved against base_dir."""
    rows, bad = _checked(raw)
    resolved, extra = _stat_files(rows, base_dir, cfg), {}
    if raw.where(F.lower(F.trim("image")).rlike("^https?://")).limit(1).count():
        fetched, extra["http"] = fetch_urls(spark, rows.where(F.lower(F.col("image")).rlike("^https?://")), cfg)
        # user:password@ in a URL is never sent (sparkml.ingest.fetch) and never stored
        redacted = F.regexp_replace("image", r"^([A-Za-z]+://)[^/?#@]*@", "$1")
        resolved = resolved.unionByName(fetched.select(*[c for c in rows.columns if c != "image"],
                                                       redacted.alias("image_uri"), "image_size", "read_uri",
                                                       "_reason", "_detail"))
    # One row per post_id: the first row of the input whose image is usable, else the first row
    # (rejected for its image); the others are duplicate posts.
    w = Window.partitionBy("post_id").orderBy(F.col("_reason").isNotNull(), "_row")
    ranked = resolved.withColumn("_rn", F.row_number().over(w)).withColumn("_kept", F.first("image_uri").over(w)) \
        .persist(StorageLevel.DISK_ONLY)
    first = ranked.where("_rn = 1")
    rejects = [
        rejects_of(bad, Reason.BAD_MANIFEST_ROW, F.col("_problem")),
        rejects_of(ranked.where("_rn > 1"), Reason.DUPLICATE_POST,
                 F.concat(F.lit("post_id repeated in the manifest; kept the row with "), F.col("_kept"))),
        first.where(F.col("_reason").isNotNull()).select("post_id", F.col("_reason").alias("reason"),
                                                          F.col("_detail").alias("detail")),
    ]
    good = first.where(F.col("_reason").isNull()).drop("_rn", "_kept", "_reason", "_detail")
    agg = good.agg(*[F.sum(F.col(f"_{k}").cast("int")).alias(k)
                     for k in ("bad_likes", "bad_followers", "bad_posted_at")]).first()
    extra["flags"] = {k: int(agg[k] or 0) for k in ("bad_likes", "bad_followers", "bad_posted_at")}
    return good.drop("_row", "_bad_likes", "_bad_followers", "_bad_posted_at"), union_all(rejects), \
        raw.select(F.col("_row").alias("key")), extra


def fetch_urls(spark: SparkSession, rows: DataFrame, cfg: Config) -> tuple[DataFrame, dict]:
    """Manifest rows whose image is an http(s) URL, fetched on executors into <lake>/cache/http
    (sparkml.ingest.fetch): the rows with read_uri (the cached bytes) and image_size, or _reason and
    _detail; persisted, with the fetch's figures for the summary."""
    cache = Lake(cfg.lake).cache("http")
    http, threads, endpoint, region = cfg.ingest.http, cfg.ingest.read_threads, cfg.s3.endpoint, cfg.s3.region
    n = rows.count()
    parts = max(spark.sparkContext.defaultParallelism, math.ceil(n / http.urls_per_task))
    schema = T.StructType(rows.schema.fields + [
        T.StructField(f.name, T.LongType() if pa.types.is_integer(f.type) else
                      T.BooleanType() if pa.types.is_boolean(f.type) else T.StringType()) for f in fetch.OUTPUT])
    acc = progress.counter(spark, n)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        def counted():
            for b in batches:
                acc.add(b.num_rows)
                yield b
        yield from fetch.fetch_batches(counted(), "image", http, cache, endpoint, region, io_threads=threads)

    t0 = time.perf_counter()
    # hashing the URL spreads one host's URLs over the tasks (and so over the executors' slots)
    out = rows.repartition(parts, "image").mapInArrow(run, schema).persist(StorageLevel.DISK_ONLY)
    a = out.agg(F.count("*").alias("urls"), F.sum(F.col("_skipped").cast("int")).alias("skipped"),
                F.sum("_requests").alias("requests"), F.sum("_retries").alias("retries"),
                F.sum("_bytes").alias("bytes"), F.max("_open_files").alias("peak_open_files"),
                F.sum(F.col("_reason").isNull().cast("int")).alias("fetched")).first()
    secs = time.perf_counter() - t0
    stats = {k: int(a[k] or 0) for k in ("urls", "skipped", "requests", "retries", "bytes", "peak_open_files")}
    stats.update(ok=int(a["fetched"] or 0), seconds=round(secs, 2), requests_per_s=round(stats["requests"] / secs, 1),
                 cache=cache)
    if stats["skipped"]:
        log.info("ingest: %d of %d URLs were already fetched (or refused for good) by an earlier run: not asked again "
                 "(%s)", stats["skipped"], n, cache)
    return out, stats
