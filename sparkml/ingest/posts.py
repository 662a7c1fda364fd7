"""What every ingest layout shares: caption decoding and status, reject rows with a reason, one
row per post_id, the URI schemes an image reference may have and the times a post may carry."""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core import storage
from core.schemas import CaptionStatus, Reason


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


def rejects_of(df: DataFrame, reason: Reason, detail) -> DataFrame:
    return df.select(F.col("post_id"), F.lit(reason.value).alias("reason"), detail.alias("detail"))


def first_per_post(df: DataFrame, order_col: str, keys: tuple[str, ...] = ("post_id",)) -> tuple[DataFrame, DataFrame]:
    """(kept, dropped): one row per key, the lowest `order_col` wins; dropped carry `kept_as`."""
    w = Window.partitionBy(*keys).orderBy(order_col)
    ranked = df.withColumn("_rn", F.row_number().over(w)).withColumn("kept_as", F.first(order_col).over(w))
    return (ranked.where("_rn = 1").drop("_rn", "kept_as"), ranked.where("_rn > 1").drop("_rn"))
