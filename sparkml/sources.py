"""Ingest: InstaCities1M folders, a manifest, an Instagram account export or a folder of
images -> <lake>/tables/posts (+ rejected).

Decisions (which records to reject, which are duplicate posts) are made on metadata
only: file listings and object sizes. Image bytes are read once, in a final pass that
never shuffles them, so ingest costs one read of the images plus one write.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core.config import Config, ConfigError
from sparkml import fetch, manifests, progress
from sparkml.lake import Lake, Summary, begin_output, union_all, write_rejected, write_table
from sparkml.schemas import (CAP_DIR, IMAGE_EXTENSIONS, IMG_DIR, INSTAGRAM_POSTS, MANIFEST_COLUMNS, POSTS, SPLIT_CAP,
                             SPLIT_IMG, SPLITS, TABLES, VIDEO_EXTENSIONS, CaptionStatus, Reason)

STAGE = "ingest"
# what an image reference may be: a path, a file/object-store URI, an http(s) URL
URI_SCHEMES = ("file", *storage.S3_SCHEMES, "gs", "http", "https")
log = logging.getLogger("instalearn")
# posted_at outside these bounds (epoch seconds) is no time an Instagram post can have: null, flagged
EPOCH_BOUNDS = (1_262_304_000, 4_102_444_800)  # 2010-01-01 (Instagram opened in October 2010) .. 2100-01-01


def decode_caption(raw: bytes | None) -> tuple[str | None, str]:
    """Caption file bytes -> (text, CaptionStatus value). Invalid UTF-8 is decoded with
    U+FFFD replacements and flagged, never dropped."""
    if raw is None:
        return None, CaptionStatus.MISSING.value
    try:
        text, status = raw.decode("utf-8"), CaptionStatus.OK.value
    except UnicodeDecodeError:
        text, status = raw.decode("utf-8", errors="replace"), CaptionStatus.NOT_UTF8.value
    text = text.lstrip("\ufeff").strip()
    if not text:
        return "", CaptionStatus.EMPTY.value
    return text, status


def caption_status(text: str | None) -> str:
    """Status of a caption given as text (manifest)."""
    if text is None:
        return CaptionStatus.MISSING.value
    return CaptionStatus.OK.value if text.strip() else CaptionStatus.EMPTY.value


def _rejects(df: DataFrame, reason: Reason, detail) -> DataFrame:
    return df.select(F.col("post_id"), F.lit(reason.value).alias("reason"), detail.alias("detail"))


def _first_per_post(df: DataFrame, order_col: str, keys: tuple[str, ...] = ("post_id",)) -> tuple[DataFrame, DataFrame]:
    """(kept, dropped): one row per key, the lowest `order_col` wins; dropped carry `kept_as`."""
    w = Window.partitionBy(*keys).orderBy(order_col)
    ranked = df.withColumn("_rn", F.row_number().over(w)).withColumn("kept_as", F.first(order_col).over(w))
    return (ranked.where("_rn = 1").drop("_rn", "kept_as"), ranked.where("_rn > 1").drop("_rn"))


# ---------------------------------------------------------------- InstaCities1M layout


def _instacities_roots(spark: SparkSession, root: str) -> tuple[str, str, bool]:
    root = storage.qualify(root).rstrip("/")
    if storage.is_dir(spark, f"{root}/{IMG_DIR}"):
        return f"{root}/{IMG_DIR}", f"{root}/{CAP_DIR}", False
    if storage.is_dir(spark, f"{root}/{SPLIT_IMG}"):
        return f"{root}/{SPLIT_IMG}", f"{root}/{SPLIT_CAP}", True
    raise ConfigError(f"source.path {root}: neither {IMG_DIR}/ nor {SPLIT_IMG}/<split>/ found "
                      "(source.layout=instacities)")


def _class_roots(spark: SparkSession, root: str) -> tuple[str, None, bool]:
    """A labelled folder: <root>/<class>/<image>, or <root>/<split>/<class>/<image> when it has
    a train/ folder; no captions."""
    root = storage.qualify(root).rstrip("/")
    if not storage.is_dir(spark, root):
        raise ConfigError(f"source.path {root} is not a folder (source.layout=classes: <class>/<image> or "
                          "<train|val|test>/<class>/<image>)")
    return root, None, storage.is_dir(spark, f"{root}/train")


def _listing(spark: SparkSession, root: str, with_split: bool, cfg: Config, class_ids: bool = False) -> DataFrame:
    """Files under root as (uri, size, split, city, post_id, ext, ok); ok = the layout's shape.
    post_id is the file's name without extension, or with class_ids <class>/<name> (a user's
    class folders may repeat a file name)."""
    files = storage.list_files(root, cfg.s3.endpoint, cfg.s3.region)
    df = spark.createDataFrame(files or [], "uri string, size long")
    parts = F.split(F.substring("uri", len(root) + 2, 1 << 20), "/")
    name = F.element_at(parts, -1)
    ext = F.lower(F.regexp_extract(name, r"\.([A-Za-z0-9]+)$", 1))
    split = F.element_at(parts, 1) if with_split else F.lit(None).cast("string")
    stem = F.regexp_replace(name, r"\.[A-Za-z0-9]+$", "")
    post_id = F.concat_ws("/", F.element_at(parts, -2), stem) if class_ids else stem
    ok = (F.size(parts) == (3 if with_split else 2)) & ~stem.startswith(".") & (stem != "")
    if with_split:
        ok = ok & split.isin(*SPLITS)
    return df.select("uri", "size", split.alias("split"), F.element_at(parts, -2).alias("city"),
                     post_id.alias("post_id"), ext.alias("ext"), ok.alias("ok"))


def ingest_instacities(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(todo, rejects, input_keys) of InstaCities1M folders or a labelled folder (source.layout
    classes: the class folder's name is the post's city column, the label build_dataset uses):
    todo rows go to the content pass."""
    classes = cfg.source.layout == "classes"
    img_root, cap_root, with_split = (_class_roots if classes else _instacities_roots)(spark, cfg.source.path)
    meta = _listing(spark, img_root, with_split, cfg, class_ids=classes)
    is_image = F.col("ok") & F.col("ext").isin(*IMAGE_EXTENSIONS)
    good = meta.where(is_image)
    kept, dropped = _first_per_post(good, "uri")
    keys = ["split", "city", "post_id"] if with_split else ["city", "post_id"]
    all_caps = (_listing(spark, cap_root, with_split, cfg) if cap_root else meta.limit(0)) \
        .where(F.col("ok") & (F.col("ext") == "txt"))
    # 1.txt and 1.TXT for one post: one caption is kept (a lowercase .txt first), the others rejected
    caps, extra_caps = _first_per_post(all_caps.withColumn("uri_order", F.concat(
        (~F.col("uri").endswith(".txt")).cast("int").cast("string"), F.col("uri"))), "uri_order", tuple(keys))
    caps, extra_caps = caps.drop("uri_order"), extra_caps.drop("uri_order")
    orphans = caps.join(good.select(*keys), keys, "left_anti")
    rejects = union_all([
        _rejects(meta.where(~is_image).withColumn("post_id", F.lit(None).cast("string")),
                 Reason.UNRECOGNIZED_FILE, F.col("uri")),
        _rejects(dropped, Reason.DUPLICATE_POST, F.concat(F.col("uri"), F.lit(" duplicates "), F.col("kept_as"))),
        _rejects(kept.where("size = 0"), Reason.EMPTY_IMAGE, F.col("uri")),
        _rejects(orphans, Reason.IMAGE_MISSING, F.concat(F.lit("caption "), F.col("uri"), F.lit(" has no image"))),
        _rejects(extra_caps.withColumn("post_id", F.lit(None).cast("string")), Reason.UNRECOGNIZED_FILE,
                 F.concat(F.col("uri"), F.lit(": a second caption file for one post (kept "),
                          F.substring("kept_as", 2, 1 << 20), F.lit(")"))),
    ])
    todo = (kept.where("size > 0")
            .join(caps.select(*keys, F.col("uri").alias("caption_uri")), keys, "left")
            .select("post_id", "city", "split", F.lit(None).cast("string").alias("caption"), "caption_uri",
                    *[F.lit(None).cast(t).alias(c) for c, t in
                      (("user_id", "string"), ("likes", "long"), ("followers", "long"), ("posted_at", "timestamp"))],
                    F.col("uri").alias("image_uri"), F.col("size").alias("image_size")))
    inputs = union_all([meta.select(F.col("uri").alias("key")), orphans.select(F.col("uri").alias("key")),
                        extra_caps.select(F.col("uri").alias("key"))])
    return todo, rejects, inputs


# ---------------------------------------------------------------- manifest layout


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
        # user:password@ in a URL is never sent (sparkml.fetch) and never stored
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
        _rejects(bad, Reason.BAD_MANIFEST_ROW, F.col("_problem")),
        _rejects(ranked.where("_rn > 1"), Reason.DUPLICATE_POST,
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
    (sparkml.fetch): the rows with read_uri (the cached bytes) and image_size, or _reason and
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


# ---------------------------------------------------------------- a personal archive: Instagram export or folder


def repair_mojibake(text: str | None) -> str | None:
    """Instagram's export writes each UTF-8 byte of a caption as its own \\u00XX escape, so
    'café' reads back as 'cafÃ©': re-encode those code points as the bytes they were and decode
    them as UTF-8. Text that is not of that shape (a character above U+00FF, bytes that are not
    UTF-8) is already right and comes back unchanged."""
    if not text:
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _ext(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def export_posts_files(root: str, endpoint: str | None = None, region: str | None = None) -> list[str]:
    """The posts_N.json files of an Instagram export at root, in order; ConfigError if none."""
    import fnmatch

    q = storage.qualify(root).rstrip("/")
    files = [u for u, _ in storage.list_files(q, endpoint, region)]
    found = sorted(u for u in files for pattern in INSTAGRAM_POSTS if fnmatch.fnmatch(u[len(q) + 1:], pattern))
    if not found:
        raise ConfigError(f"source.path {root}: no {' or '.join(INSTAGRAM_POSTS)} (source.layout=instagram expects "
                          "the unzipped folder of an Instagram 'Download your information' export in JSON format)")
    return found


def _timestamp(value) -> tuple[str | None, bool]:
    """(epoch seconds as text, or None; whether a value was given that is not a plausible time)."""
    if value is None:
        return None, False
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            EPOCH_BOUNDS[0] <= value < EPOCH_BOUNDS[1]):
        return None, True
    return str(value), False


def export_media(posts: list) -> list[dict]:
    """One record per media item of a parsed posts_N.json: its uri, the post's caption (repaired)
    and time, and its index in the post (carousel posts hold several media); a post that is not
    of the export's shape (a title that is not text, media that is not a list of objects) gives
    one record with its `problem`, and a time out of range is None with `bad_time`."""
    if not isinstance(posts, list):
        raise ValueError("not a list of posts")
    out = []
    for p, post in enumerate(posts):
        media = post.get("media") if isinstance(post, dict) else None
        if not isinstance(media, list) or not all(isinstance(m, dict) for m in media):
            out.append({"post": p, "index": 0, "uri": None, "problem": "media is not a list of objects"})
            continue
        caption = post.get("title") or (media[0].get("title") if len(media) == 1 else None)
        if caption is not None and not isinstance(caption, str):
            out.append({"post": p, "index": 0, "uri": None,
                        "problem": f"title is a {type(caption).__name__}, not text"})
            continue
        for i, m in enumerate(media):
            posted_at, bad_time = _timestamp(m.get("creation_timestamp", post.get("creation_timestamp")))
            out.append({"post": p, "index": i, "uri": m.get("uri"), "caption": repair_mojibake(caption),
                        "posted_at": posted_at, "bad_time": bad_time})
    return out


def _archive_raw(spark: SparkSession, cfg: Config) -> tuple[list[dict], list[tuple], dict]:
    """(manifest-shaped rows of the archive's images, (key, reason, detail) of what is not one,
    counts for the summary). Nothing outside the archive's folder is read: media paths that lead
    out of it ('..', absolute, file://, a symlink) are rejected, symlinked folders not followed."""
    root = storage.qualify(cfg.source.path).rstrip("/")
    rows, rejects, skipped = [], [], []
    counts = {"symlinked_folders_not_followed": 0, "bad_posted_at": 0}
    if cfg.source.layout == "folder":
        if not storage.is_dir(spark, root):
            raise ConfigError(f"source.path {cfg.source.path} is not a folder (source.layout=folder)")
        for uri, _ in storage.list_files(root, cfg.s3.endpoint, cfg.s3.region, skipped):
            rel = uri[len(root) + 1:]
            if rel.startswith(".") or "/." in rel:
                continue  # hidden files (.DS_Store, ._*) are the file system's, not the archive's
            ext = _ext(uri)
            if ext in IMAGE_EXTENSIONS:
                rows.append({"post_id": rel.rsplit(".", 1)[0], "image": uri})
            else:
                rejects.append((None, Reason.VIDEO if ext in VIDEO_EXTENSIONS else Reason.UNRECOGNIZED_FILE, uri))
        for uri, why in skipped:
            if why.startswith("a symlinked folder"):
                counts["symlinked_folders_not_followed"] += 1
            else:
                rejects.append((None, Reason.PATH_OUTSIDE_ARCHIVE, f"{uri}: {why}"))
        return rows, rejects, counts
    for posts_file in export_posts_files(root, cfg.s3.endpoint, cfg.s3.region):
        try:
            media = export_media(json.loads(storage.read_bytes(spark, posts_file)))
        except ValueError as e:
            raise ConfigError(f"{posts_file} is not an Instagram posts file ({e})") from None
        for m in media:
            key = f"{posts_file}#{m['post']}/{m['index']}"
            uri = m["uri"]
            if m.get("problem"):
                rejects.append((None, Reason.BAD_MANIFEST_ROW, f"{key}: {m['problem']}"))
            elif not isinstance(uri, str) or not uri.strip():
                rejects.append((None, Reason.BAD_MANIFEST_ROW, f"{key}: a post without media[].uri"))
            elif not storage.inside(root, storage.resolve(root, uri)):
                rejects.append((_stem(uri), Reason.PATH_OUTSIDE_ARCHIVE,
                                f"{key}: {uri} leads outside the export's folder {root}"))
            elif _ext(uri) in VIDEO_EXTENSIONS:
                rejects.append((_stem(uri), Reason.VIDEO, uri))
            elif _ext(uri) not in IMAGE_EXTENSIONS:
                rejects.append((_stem(uri), Reason.UNRECOGNIZED_FILE, uri))
            else:
                counts["bad_posted_at"] += m["bad_time"]
                rows.append({"post_id": _stem(uri), "image": uri, "caption": m["caption"], "posted_at": m["posted_at"]})
    return rows, rejects, counts


def ingest_archive(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame, dict]:
    """(todo, rejects, input_keys, extra) for an Instagram export or a folder of images: the
    images become manifest rows (so duplicates, missing and empty files are handled alike);
    videos and other files are rejected with their reason."""
    rows, skipped, counts = _archive_raw(spark, cfg)
    strings = T.StructType([T.StructField(c, T.StringType()) for c in MANIFEST_COLUMNS])
    raw = spark.createDataFrame([tuple(r.get(c) for c in MANIFEST_COLUMNS) for r in rows], strings) \
        .withColumn("_corrupt", F.lit(None).cast("string")).withColumn("_row", F.monotonically_increasing_id())
    todo, rejects, inputs, extra = manifest_rows(spark, raw, storage.qualify(cfg.source.path), cfg)
    extra["flags"]["bad_posted_at"] += counts.pop("bad_posted_at")  # out of range: null, counted
    extra.update(counts)
    inputs = inputs.select(F.col("key").cast("string"))
    if skipped:
        other = spark.createDataFrame([(k, r.value, d) for k, r, d in skipped],
                                      "post_id string, reason string, detail string")
        rejects = rejects.unionByName(other)
        inputs = inputs.unionByName(other.select(F.col("detail").alias("key")))
    return todo, rejects, inputs, extra


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
