"""Duplicate images: exact (same SHA-256 of the original bytes) and near (pHash within
dedup.max_hamming at the best pairing of centred zooms, verified by the 256-bit hashes of
that pairing), one canonical post kept per group (the lowest post_id).

Crop-tolerant: every image has the 64-bit pHash of the whole image and of centred zooms
(sparkml.phash.ZOOMS). A re-post cropped by c per side hashes like its original's zoom
nearest c; a re-post with a frame added has a zoom that hashes like the original. So a pair
is a candidate when one image's whole-image hash is near any hash of the other.

The search is exact within that rule and not all-pairs: multi-index hashing. The 64 hash
bits are cut into `bands` bands; two hashes within t bits agree within floor(t/bands) bits
on at least one band (pigeonhole). Every hash (whole and zooms) is indexed by its band
values; every whole-image hash probes each value within that radius; an equi-join on
(band, value) finds every pair within t. Only those candidates have their distances
computed: the 64-bit one (<= max_hamming) and, as verification, the 256-bit one of the same
pairing (<= verify_bits), which keeps unrelated photos that happen to come close in 64 bits
out (docs/benchmarks.md).

Cost for N images with Z hashes each, b bands of w = 64/b bits and radius r = floor(t/b):
index rows N*Z*b, probe rows N*b*P with P = sum_{k<=r} C(w, k), candidates about
N^2 * Z * b * P / 2^w for evenly spread hashes (t=6, b=4, Z=3: P=17, ~3e-3 * N^2).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from sparkml.config import Config
from sparkml.lake import Lake, Summary, begin_output, conform, read_table, union_all, write_table
from sparkml.phash import WORDS_256, ZOOMS


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


def _hashes(df: DataFrame, *keep) -> DataFrame:
    """post_id, h (array: the whole image's 64-bit pHash, then each zoom's), v (the 256-bit ones)
    and the `keep` columns."""
    return df.select("post_id", F.concat(F.array("phash"), "zoom_phash").alias("h"), F.col("phash256").alias("v"),
                     *keep)


def _bits_apart(h1: str, v1: str, level: str, h2: str, v2: str) -> tuple:
    """(64-bit distance, 256-bit distance) between hash `level` of one image and the whole other."""
    d64 = F.expr(f"bit_count(element_at({h1}, {level} + 1) ^ element_at({h2}, 1))")
    d256 = sum(F.expr(f"bit_count(element_at({v1}, {level} * {WORDS_256} + {w + 1}) ^ element_at({v2}, {w + 1}))")
               for w in range(WORDS_256))
    return d64, d256


def best_pairing(h1: str, h2: str):
    """The 64-bit distance of two images at their best pairing: whole with whole, or a zoom of
    one with the other whole (a crop of one, or a frame around the other)."""
    pairs = [(0, 0)] + [(k, 0) for k in range(1, len(ZOOMS))] + [(0, k) for k in range(1, len(ZOOMS))]
    return F.least(*[F.expr(f"bit_count(element_at({h1}, {a + 1}) ^ element_at({h2}, {b + 1}))") for a, b in pairs])


def candidate_pairs(reps: DataFrame, max_hamming: int, bands: int, verify_bits: int) -> tuple[DataFrame, DataFrame]:
    """(pairs, candidates): every pair (a < b) of images where a zoom (or the whole) of one is
    within max_hamming bits of the whole other and the same pairing's 256-bit hashes are within
    verify_bits, as (a, b, hamming); and the candidates the band join proposed (a, level, b).

    Each image is indexed by the band values of all its hashes (whole + zooms) and probes with
    its whole-image hash: a copy cropped by c per side lands on the original's zoom nearest c."""
    radius = max_hamming // bands
    hashed = _hashes(reps)
    levels = hashed.select("post_id", F.posexplode("h").alias("level", "hash"))
    whole = hashed.select("post_id", F.col("h")[0].alias("hash"))
    index, probes = [], []
    for i, (lo, hi) in enumerate(band_bounds(bands)):
        value = F.expr(f"shiftrightunsigned(hash, {lo}) & {(1 << (hi - lo)) - 1}")
        index.append(levels.select(F.col("post_id").alias("a"), "level", F.lit(i).alias("band"), value.alias("value")))
        masks = F.array(*[F.lit(m).cast("long") for m in probe_masks(hi - lo, radius)])
        probes.append(whole.select(F.col("post_id").alias("b"), F.lit(i).alias("band"),
                                   F.explode(F.transform(masks, lambda m: value.bitwiseXOR(m))).alias("value")))
    candidates = (union_all(index).join(union_all(probes), ["band", "value"])
                  .where(F.col("a") != F.col("b")).select("a", "level", "b").distinct())
    side = hashed.select("post_id", "h", "v")
    joined = (candidates.join(side.toDF("a", "ha", "va"), "a").join(side.toDF("b", "hb", "vb"), "b"))
    d64, d256 = _bits_apart("ha", "va", "level", "hb", "vb")
    verified = joined.select("a", "b", d64.alias("d64"), d256.alias("d256")).where(
        (F.col("d64") <= max_hamming) & (F.col("d256") <= verify_bits))
    pairs = (verified.select(F.least("a", "b").alias("a"), F.greatest("a", "b").alias("b"), "d64")
             .groupBy("a", "b").agg(F.min("d64").cast("int").alias("hamming")))
    return pairs, candidates


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


def find_duplicates(spark: SparkSession, images: DataFrame, max_hamming: int, bands: int,
                    verify_bits: int) -> tuple[DataFrame, int]:
    """(duplicates in the DUPLICATES schema, candidates the band join proposed)."""
    w = Window.partitionBy("sha256").orderBy(*_order_key())
    ranked = images.select("post_id", "sha256", "phash", "zoom_phash", "phash256") \
        .withColumn("_rn", F.row_number().over(w)).withColumn("_first", F.first("post_id").over(w)).persist()
    reps = ranked.where("_rn = 1").select("post_id", "phash", "zoom_phash", "phash256")
    pairs, candidates = candidate_pairs(reps, max_hamming, bands, verify_bits)
    candidates = candidates.persist()
    n_candidates = candidates.count()
    edges = pairs.select("a", "b").collect()
    candidates.unpersist()
    canon = _components([(r.a, r.b) for r in edges])
    near_map = spark.createDataFrame(list(canon.items()) or [], "rep string, canonical string")
    # Every image maps to its exact group's representative, then to that one's near canonical.
    mapped = (_hashes(ranked, "sha256", F.col("_first").alias("rep"))
              .join(F.broadcast(near_map), "rep", "left")
              .withColumn("canonical_post_id", F.coalesce("canonical", "rep")))
    canon = _hashes(images, "sha256").toDF("canonical_post_id", "ch", "cv", "csha")
    dups = (mapped.where(F.col("post_id") != F.col("canonical_post_id")).join(canon, "canonical_post_id")
            .select("post_id", "canonical_post_id",
                    F.when(F.col("sha256") == F.col("csha"), "exact").otherwise("near").alias("kind"),
                    best_pairing("h", "ch").cast("int").alias("hamming")))
    ranked.unpersist()
    return conform(dups, "duplicates"), n_candidates


def dedup(spark: SparkSession, cfg: Config) -> Summary:
    """images -> <lake>/tables/duplicates; unique images are images anti-join duplicates."""
    lake = Lake(cfg.lake)
    out = lake.table("duplicates")
    begin_output(spark, out)
    images = read_table(spark, lake, "images")
    d = cfg.dedup
    dups, n_candidates = find_duplicates(spark, images, d.max_hamming, d.bands, d.verify_bits)
    write_table(dups.repartition(1).sortWithinPartitions("post_id"), lake, "duplicates")
    kinds = {r["kind"]: int(r["count"]) for r in spark.read.parquet(out).groupBy("kind").count().collect()}
    n = images.count()
    return Summary(stage="dedup", input_rows=n, output_rows=n - sum(kinds.values()),
                   duplicates={k: kinds.get(k, 0) for k in ("exact", "near")}, output=out,
                   extra={"max_hamming": d.max_hamming, "bands": d.bands, "verify_bits": d.verify_bits,
                          "zooms": list(ZOOMS), "candidate_pairs": n_candidates})


def unique_images(spark: SparkSession, lake: Lake) -> DataFrame:
    """The images table without the duplicates dedup found."""
    images = read_table(spark, lake, "images")
    dups = read_table(spark, lake, "duplicates").select("post_id")
    return images.join(F.broadcast(dups), "post_id", "left_anti")
