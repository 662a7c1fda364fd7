"""Duplicate images: exact (same SHA-256 of the original bytes) and near (pHash within
dedup.max_hamming), one canonical post kept per group (the lowest post_id).

The near-duplicate search is exact and not all-pairs: multi-index hashing. The 64 hash
bits are cut into `bands` bands; two hashes within t bits agree within floor(t/bands)
bits on at least one band (pigeonhole). Each hash is indexed by its band values and
probes every value within that radius, so an equi-join on (band, value) finds every
pair within t, and only those candidates have their full distance computed.

Cost for N hashes with b bands of w = 64/b bits and radius r = floor(t/b): index rows
N*b, probe rows N*b*P with P = sum_{k<=r} C(w, k), candidate pairs about
(N^2/2) * b * P / 2^w for evenly spread hashes (t=6, b=4: P=17, ~5e-4 * N^2/2).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from sparkml.config import Config
from sparkml.lake import Lake, Summary, begin_output, conform, read_table, union_all, write_table


def band_bounds(bands: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def probe_masks(width: int, radius: int) -> list[int]:
    """XOR masks of every value within `radius` bits of a `width`-bit band value (0 first)."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << i for i in bits) for bits in combinations(range(width), k)]
    return masks


def _order_key(col: str = "post_id"):
    # "Lowest post_id": numeric ids compare as numbers (shorter first), others lexically.
    return [F.length(col), F.col(col)]


def candidate_pairs(reps: DataFrame, max_hamming: int, bands: int) -> DataFrame:
    """(a, b, hamming) for every candidate pair (a < b) the band join finds; every pair within
    max_hamming is among them, the caller keeps those."""
    radius = max_hamming // bands
    index, probes = [], []
    for i, (lo, hi) in enumerate(band_bounds(bands)):
        value = F.expr(f"shiftrightunsigned(phash, {lo}) & {(1 << (hi - lo)) - 1}")
        index.append(reps.select("post_id", F.lit(i).alias("band"), value.alias("value")))
        masks = F.array(*[F.lit(m).cast("long") for m in probe_masks(hi - lo, radius)])
        probes.append(reps.select(F.col("post_id").alias("b"), F.lit(i).alias("band"),
                                  F.explode(F.transform(masks, lambda m: value.bitwiseXOR(m))).alias("value")))
    pairs = (union_all(index).withColumnRenamed("post_id", "a").join(union_all(probes), ["band", "value"])
             .where(F.col("a") < F.col("b")).select("a", "b").distinct())
    ph = reps.select("post_id", "phash")
    return (pairs.join(ph.withColumnRenamed("post_id", "a").withColumnRenamed("phash", "pa"), "a")
            .join(ph.withColumnRenamed("post_id", "b").withColumnRenamed("phash", "pb"), "b")
            .select("a", "b", F.expr("bit_count(pa ^ pb)").cast("int").alias("hamming")))


def _components(edges: list[tuple[str, str]]) -> dict[str, str]:
    """post_id -> canonical (lowest) post_id of its connected component, for ids in edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = sorted({x for e in edges for x in e}, key=lambda s: (len(s), s))
    pos = {x: i for i, x in enumerate(ids)}
    rows = np.array([pos[a] for a, _ in edges])
    cols = np.array([pos[b] for _, b in edges])
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(ids), len(ids)))
    _, label = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for i, lab in enumerate(label):  # ids are sorted, so the first seen is the lowest
        first.setdefault(int(lab), ids[i])
    return {x: first[int(label[i])] for i, x in enumerate(ids)}


def find_duplicates(spark: SparkSession, images: DataFrame, max_hamming: int, bands: int) -> tuple[DataFrame, int]:
    """(duplicates in the DUPLICATES schema, candidate pairs verified)."""
    w = Window.partitionBy("sha256").orderBy(*_order_key())
    ranked = images.select("post_id", "sha256", "phash").withColumn("_rn", F.row_number().over(w)) \
        .withColumn("_first", F.first("post_id").over(w)).persist()
    reps = ranked.where("_rn = 1").select("post_id", "phash", "sha256")
    candidates = candidate_pairs(reps, max_hamming, bands).persist()
    n_candidates = candidates.count()
    edges = candidates.where(F.col("hamming") <= max_hamming).select("a", "b").collect()
    candidates.unpersist()
    canon = _components([(r.a, r.b) for r in edges])
    near_map = spark.createDataFrame(list(canon.items()) or [], "rep string, canonical string")
    # Every image maps to its exact group's representative, then to that one's near canonical.
    mapped = (ranked.select("post_id", "sha256", "phash", F.col("_first").alias("rep"))
              .join(F.broadcast(near_map), "rep", "left")
              .withColumn("canonical_post_id", F.coalesce("canonical", "rep")))
    cph = images.select(F.col("post_id").alias("canonical_post_id"), F.col("sha256").alias("csha"),
                        F.col("phash").alias("cph"))
    dups = (mapped.where(F.col("post_id") != F.col("canonical_post_id")).join(cph, "canonical_post_id")
            .select("post_id", "canonical_post_id",
                    F.when(F.col("sha256") == F.col("csha"), "exact").otherwise("near").alias("kind"),
                    F.expr("bit_count(phash ^ cph)").cast("int").alias("hamming")))
    ranked.unpersist()
    return conform(dups, "duplicates"), n_candidates


def dedup(spark: SparkSession, cfg: Config) -> Summary:
    """images -> <lake>/tables/duplicates; unique images are images anti-join duplicates."""
    lake = Lake(cfg.lake)
    out = lake.table("duplicates")
    begin_output(spark, out)
    images = read_table(spark, lake, "images")
    dups, n_candidates = find_duplicates(spark, images, cfg.dedup.max_hamming, cfg.dedup.bands)
    write_table(dups.repartition(1).sortWithinPartitions("post_id"), lake, "duplicates")
    kinds = {r["kind"]: int(r["count"]) for r in spark.read.parquet(out).groupBy("kind").count().collect()}
    n = images.count()
    return Summary(stage="dedup", input_rows=n, output_rows=n - sum(kinds.values()),
                   duplicates={k: kinds.get(k, 0) for k in ("exact", "near")}, output=out,
                   extra={"max_hamming": cfg.dedup.max_hamming, "bands": cfg.dedup.bands,
                          "candidate_pairs": n_candidates})


def unique_images(spark: SparkSession, lake: Lake) -> DataFrame:
    """The images table without the duplicates dedup found."""
    images = read_table(spark, lake, "images")
    dups = read_table(spark, lake, "duplicates").select("post_id")
    return images.join(F.broadcast(dups), "post_id", "left_anti")
