"""Which split (train / val / test) a post belongs to: a deterministic function of its post_id,
the same in every stage (LDA training, datasets, retrieval evaluation) and on every rerun."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.schemas import SPLITS


def assign_split(df: DataFrame, train: float, val: float, respect_source: bool) -> DataFrame:
    """Deterministic split by a hash of post_id (the source's split wins where it gave one)."""
    u = F.pmod(F.xxhash64(F.col("post_id")), F.lit(1_000_000)) / 1_000_000.0
    hashed = F.when(u < train, "train").when(u < train + val, "val").otherwise("test")
    if respect_source and "split" in df.columns:
        hashed = F.coalesce(F.when(F.col("split").isin(*SPLITS), F.col("split")), hashed)
    return df.withColumn("split", hashed)
