"""A personal archive: an Instagram account export (its posts JSON, captions' mojibake repaired)
or a plain folder of images -> post rows."""

from __future__ import annotations

import json

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core.config import Config, ConfigError
from core.schemas import IMAGE_EXTENSIONS, INSTAGRAM_POSTS, MANIFEST_COLUMNS, VIDEO_EXTENSIONS, Reason
from sparkml.ingest.manifest import manifest_rows
from sparkml.ingest.posts import EPOCH_BOUNDS


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
