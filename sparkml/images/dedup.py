"""Duplicate images: exact (same SHA-256 of the original bytes) and near (pHash within
dedup.max_hamming at the best pairing of centred zooms, verified by the 256-bit hashes of
that pairing), one canonical post kept per group (the lowest post_id).

Crop-tolerant: every image has the 64-bit pHash of the whole image and of centred zooms
(sparkml.images.phash.ZOOMS). A re-post cropped by c per side hashes like its original's zoom
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

from core.config import Config
from core.lake import Lake, Summary, begin_output, conform, read_table, union_all, write_table
from sparkml.images.phash import WORDS_256, ZOOMS


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


def mih_candidates(hashed: DataFrame, max_hamming: int, bands: int) -> DataFrame:
    """The exact search's candidates (a, level, b): image a's hash `level` (whole or a zoom) and
    image b's whole hash agree within floor(t / bands) bits on at least one band (multi-index
    hashing: every pair within t is among them)."""
    radius = max_hamming // bands
    levels = hashed.select("post_id", F.posexplode("h").alias("level", "hash"))
    whole = hashed.select("post_id", F.col("h")[0].alias("hash"))
    index, probes = [], []
    for i, (lo, hi) in enumerate(band_bounds(bands)):
        value = F.expr(f"shiftrightunsigned(hash, {lo}) & {(1 << (hi - lo)) - 1}")
        index.append(levels.select(F.col("post_id").alias("a"), "level", F.lit(i).alias("band"), value.alias("value")))
        masks = F.array(*[F.lit(m).cast("long") for m in probe_masks(hi - lo, radius)])
        probes.append(whole.select(F.col("post_id").alias("b"), F.lit(i).alias("band"),
                                   F.explode(F.transform(masks, lambda m: value.bitwiseXOR(m))).alias("value")))
    return (union_all(index).join(union_all(probes), ["band", "value"])
            .where(F.col("a") != F.col("b")).select("a", "level", "b").distinct())


def verify(candidates: DataFrame, hashed: DataFrame, max_hamming: int, verify_bits: int) -> DataFrame:
    """Candidates (a, level, b) -> pairs (a < b, hamming) whose pairing is within max_hamming in 64
    bits and within verify_bits in the 256-bit hashes of the same pairing."""
    side = hashed.select("post_id", "h", "v")
    joined = (candidates.join(side.toDF("a", "ha", "va"), "a").join(side.toDF("b", "hb", "vb"), "b"))
    d64, d256 = _bits_apart("ha", "va", "level", "hb", "vb")
    verified = joined.select("a", "b", d64.alias("d64"), d256.alias("d256")).where(
        (F.col("d64") <= max_hamming) & (F.col("d256") <= verify_bits))
    return (verified.select(F.least("a", "b").alias("a"), F.greatest("a", "b").alias("b"), "d64")
            .groupBy("a", "b").agg(F.min("d64").cast("int").alias("hamming")))


def candidate_pairs(reps: DataFrame, max_hamming: int, bands: int, verify_bits: int) -> tuple[DataFrame, DataFrame]:
    """(pairs, candidates) of the exact search: every pair (a < b) of images where a zoom (or the
    whole) of one is within max_hamming bits of the whole other and the same pairing's 256-bit
    hashes are within verify_bits, as (a, b, hamming); and the candidates the band join proposed
    (a, level, b). Each image is indexed by the band values of all its hashes (whole + zooms) and
    probes with its whole-image hash: a copy cropped by c per side lands on the original's zoom
    nearest c."""
    hashed = _hashes(reps)
    candidates = mih_candidates(hashed, max_hamming, bands)
    return verify(candidates, hashed, max_hamming, verify_bits), candidates


# ---------------------------------------------------------------- the approximate search for large inputs

BITS = 63  # pHash's top bit is the DC coefficient, above the median in every image: it carries nothing
LSH_OUT = "t short, n long, a long, level byte, b long, d64 byte"  # n: a partition's candidate count row


def _recall_one_table(k: int, d: int) -> float:
    """P(two hashes d bits apart agree on k of the BITS positions drawn without replacement)."""
    from math import comb

    return comb(BITS - d, k) / comb(BITS, k)


def lsh_params(n_hashes: int, max_hamming: int, recall: float, per_image: int) -> tuple[int, int]:
    """(k bits per key, L tables): L reaches `recall` for a pair max_hamming bits apart; k is the
    smallest whose bucket mates for evenly spread hashes (L * n_hashes / 2^k per probe) stay within
    a third of `per_image` (the rest is left for hashes that are not evenly spread)."""
    from math import ceil, log

    for k in range(16, 41):
        tables = ceil(log(1 - recall) / log(1 - _recall_one_table(k, max_hamming)))
        if tables * n_hashes / 2 ** k <= per_image / 3:
            return k, tables
    return k, tables


def table_positions(tables: int, seed: int) -> np.ndarray:
    """(L, BITS): each table's own random order of the hash's bit positions: its key is the first
    k of them, sub-keys for crowded buckets the next ones."""
    return np.stack([np.random.default_rng([seed, t]).permutation(BITS) for t in range(tables)])


def _bits(h: np.ndarray) -> np.ndarray:
    """int64 hashes (n,) -> (n, 64) bit matrix, column i = bit i (least significant first)."""
    return np.unpackbits(h.astype("<i8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")


def keys(h: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """int64 keys of hashes h (n,) from the bits at `positions` (a table's first k, or a sub-key's)."""
    weights = (np.int64(1) << np.arange(len(positions), dtype=np.int64))
    return _bits(h)[:, positions].astype(np.int64) @ weights


_POP = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    return _POP[x.astype("<i8").view(np.uint8).reshape(-1, 8)].sum(1)


def lsh_rows(batches, k: int, positions: np.ndarray):
    """Arrow batches of (id, h: array<long> whole + zooms) -> one row per image, hash level and
    table: (t, key, id, level, h), the key the table's first k bit positions of that hash."""
    import pyarrow as pa

    tables = len(positions)
    for batch in batches:
        ids = batch.column("id").to_numpy()
        flat = batch.column("h").flatten().to_numpy().astype(np.int64)  # n images x Z hashes, image-major
        n = len(ids)
        z = len(flat) // max(n, 1)
        level = np.tile(np.arange(z, dtype=np.int8), n)
        img = np.repeat(ids, z)
        bits = _bits(flat)
        for t in range(tables):
            key = bits[:, positions[t, :k]].astype(np.int64) @ (np.int64(1) << np.arange(k, dtype=np.int64))
            yield pa.RecordBatch.from_pydict({"t": np.full(len(flat), t, np.int16), "key": key, "id": img,
                                              "level": level, "h": flat})


def _pairs_in(rows: dict, group: np.ndarray, max_hamming: int, out: list, window: int | None = None) -> int:
    """Ordered candidates (a at any level, b whole) among the rows whose `group` ids are equal
    (consecutive), at most `window` rows apart when given, emitted when within max_hamming;
    returns how many were enumerated."""
    n = len(group)
    seen = 0
    offset = 1
    while offset < n and (window is None or offset <= window):
        same = np.flatnonzero(group[:-offset] == group[offset:])
        if len(same) == 0:
            break
        r, s = same, same + offset
        d = popcount(rows["h"][r] ^ rows["h"][s])
        for x, y in ((r, s), (s, r)):  # x indexed at its level, y probing with its whole hash
            ok = (rows["level"][y] == 0) & (rows["id"][x] != rows["id"][y])
            seen += int(ok.sum())
            keep = ok & (d <= max_hamming)
            if keep.any():
                out.append((rows["id"][x][keep], rows["level"][x][keep], rows["id"][y][keep], d[keep]))
        offset += 1
    return seen


def _bucket_pairs(rows: dict, lo: int, hi: int, positions: np.ndarray, k: int, cap: int, max_hamming: int,
                  out: list, stats: dict, depth: int = 0) -> None:
    """One crowded bucket rows[lo:hi] (more than `cap` rows): split by the table's next 8 bit
    positions (a sub-key) until every part holds at most `cap`, and after 3 splits pair each row
    only with the `cap` rows after it in hash order (the pairs that split misses are the price)."""
    t = int(rows["t"][lo])
    idx = np.arange(lo, hi)
    extra = positions[t, k + 8 * depth:k + 8 * (depth + 1)]
    if depth >= 3 or len(extra) == 0:
        stats["windowed_rows"] += hi - lo
        order = idx[np.lexsort((rows["id"][idx], rows["h"][idx]))]
        part = {c: v[order] for c, v in rows.items()}
        stats["candidates"] += _pairs_in(part, np.zeros(hi - lo, np.int64), max_hamming, out, window=cap)
        return
    sub = keys(rows["h"][idx], extra)
    order = idx[np.argsort(sub, kind="stable")]
    sub = np.sort(sub, kind="stable")
    starts = np.flatnonzero(np.r_[True, sub[1:] != sub[:-1]])
    ends = np.r_[starts[1:], len(sub)]
    part = {c: v[order] for c, v in rows.items()}
    for a, b in zip(starts, ends):
        if b - a > cap:
            sub_rows = {c: v[a:b] for c, v in part.items()}
            _bucket_pairs(sub_rows, 0, b - a, positions, k, cap, max_hamming, out, stats, depth + 1)
        elif b - a > 1:
            stats["candidates"] += _pairs_in({c: v[a:b] for c, v in part.items()}, np.zeros(b - a, np.int64),
                                             max_hamming, out)
    stats["split_buckets"] += 1


def lsh_pairs(batches, positions: np.ndarray, k: int, cap: int, max_hamming: int):
    """Rows (t, key, id, level, h) sorted by (t, key) within a partition -> the candidates within
    max_hamming (a, level, b, d64) and, last, one row with this partition's count of candidates
    enumerated (n). A bucket may continue from one Arrow batch into the next: it is carried over."""
    import pyarrow as pa

    stats = {"candidates": 0, "split_buckets": 0, "windowed_rows": 0}
    carry = carry_tk = None
    cols = ("t", "key", "id", "level", "h")

    def process(rows: dict, tk: np.ndarray) -> list:
        """The candidates of whole buckets; tk: each row's bucket (table, key)."""
        out: list = []
        starts = np.flatnonzero(np.r_[True, tk[1:] != tk[:-1]])
        sizes = np.diff(np.r_[starts, len(tk)])
        group = np.repeat(np.arange(len(starts)), sizes)
        crowded = sizes > cap
        if crowded.any():
            for st, size in zip(starts[crowded], sizes[crowded]):
                _bucket_pairs(rows, st, st + size, positions, k, cap, max_hamming, out, stats)
            group = np.where(np.repeat(crowded, sizes), -1 - np.arange(len(group)), group)  # no pairs here again
        stats["candidates"] += _pairs_in(rows, group, max_hamming, out)
        return out

    def emit(found: list):
        if found:
            a, level, b, d = (np.concatenate(x) for x in zip(*found))
            yield pa.RecordBatch.from_pydict({"t": np.zeros(len(a), np.int16), "n": np.zeros(len(a), np.int64),
                                              "a": a, "level": level.astype(np.int8), "b": b,
                                              "d64": d.astype(np.int8)})

    for batch in batches:
        rows = {c: batch.column(c).to_numpy() for c in cols}
        if carry is not None:
            rows = {c: np.concatenate([carry[c], rows[c]]) for c in cols}
        tk = rows["t"].astype(np.int64) * (1 << 40) + rows["key"]  # one id per bucket (k <= 40 bits)
        last = np.searchsorted(tk, tk[-1])  # the last bucket may go on in the next batch
        carry = {c: v[last:] for c, v in rows.items()}
        carry_tk = tk[last:]
        if last:
            yield from emit(process({c: v[:last] for c, v in rows.items()}, tk[:last]))
    if carry is not None and len(carry["t"]):
        yield from emit(process(carry, carry_tk))
    yield pa.RecordBatch.from_pydict({"t": np.array([-1], np.int16), "n": np.array([stats["candidates"]], np.int64),
                                      "a": np.array([stats["split_buckets"]], np.int64),
                                      "level": np.array([0], np.int8), "b": np.array([stats["windowed_rows"]], np.int64),
                                      "d64": np.array([0], np.int8)})


def lsh_candidates(spark: SparkSession, hashed: DataFrame, n: int, d) -> tuple[DataFrame, dict, list]:
    """The approximate search's candidates (a, level, b), already within d.max_hamming, its
    figures and the frames it cached. Locality-sensitive hashing by bit sampling: L tables each
    key every hash (whole and zooms) by k of its bits; a zoom of a and the whole of b sharing a
    key in any table are a candidate. A pair t bits apart collides in one table with probability
    C(63-t, k) / C(63, k); L is set for d.recall at t = max_hamming, k for
    d.candidates_per_image (lsh_params). Buckets above d.bucket_cap rows (hashes that are not
    evenly spread: plain backgrounds, text on white) are split by further bits of the table, so
    no task is quadratic in them. All tables' rows are one shuffle sorted by (table, key); the
    pairs are enumerated and checked in 64 bits by numpy, partition by partition."""
    z = len(ZOOMS)
    k, tables = lsh_params((d.lsh_images or n) * z, d.max_hamming, d.recall, d.candidates_per_image)
    positions = table_positions(tables, d.seed)
    # integer ids in post_id order (unique and ordered whatever the partitioning; not consecutive)
    ids = hashed.select("post_id", "h").orderBy(*_order_key()).withColumn("id", F.monotonically_increasing_id()) \
        .persist()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "50000")
    rows = ids.select("id", "h").mapInArrow(lambda bs: lsh_rows(bs, k, positions),
                                            "t short, key long, id long, level byte, h long")
    parts = max(spark.sparkContext.defaultParallelism, -(-n * z * tables // 2_000_000))
    cap, hamming = d.bucket_cap, d.max_hamming
    found = (rows.repartition(parts, "t", "key").sortWithinPartitions("t", "key")
             .mapInArrow(lambda bs: lsh_pairs(bs, positions, k, cap, hamming), LSH_OUT)
             .persist())
    stats = found.where("t = -1").agg(F.sum("n").alias("n"), F.sum("a").alias("split"), F.sum("b").alias("windowed")) \
        .first()
    names = ids.select("id", "post_id")
    candidates = (found.where("t = 0").select("a", "level", "b").distinct()
                  .join(names.toDF("a", "pa"), "a").join(names.toDF("b", "pb"), "b")
                  .select(F.col("pa").alias("a"), "level", F.col("pb").alias("b")))
    figures = {"bits": k, "tables": tables, "buckets_split": int(stats["split"] or 0),
               "rows_paired_by_window": int(stats["windowed"] or 0), "candidate_pairs": int(stats["n"] or 0)}
    return candidates, figures, [ids, found]


def components(edges: DataFrame) -> DataFrame:
    """(post_id, canonical) for every post_id in the edges (a, b): the lowest post_id (numeric ids
    by value) of its connected component, found on the executors, never collected: each round every
    node takes the lowest label among its own and its neighbours', then its label's label (pointer
    jumping, so a chain of n images settles in about log2(n) rounds), until no label changes."""
    def key(c: str):  # compares as _order_key does; the id itself is field s
        length, value = _order_key(c)
        return F.struct(length.alias("n"), value.alias("s"))

    # Checkpointed, not persisted: every round's queries then start from these rows instead of
    # carrying the plan that found the edges (a cached frame's plan is nested in every plan over
    # it: persisted, the rounds' queries of test_prepare_dedup.py's dedups put 167 MB of plan text
    # in Spark's event log, up to 2.7 MB a query, each string built on the driver).
    both = edges.select(F.col("a").alias("u"), F.col("b").alias("v")) \
        .union(edges.select(F.col("b").alias("u"), F.col("a").alias("v"))).localCheckpoint()
    labels = both.select("u").distinct().withColumn("label", F.col("u")).localCheckpoint()
    while True:
        seen = both.join(labels.toDF("v", "lv"), "v").groupBy("u").agg(F.min(key("lv")).alias("m"))
        low = labels.join(seen, "u").select("u", F.least(key("label"), "m")["s"].alias("label"))
        jumped = low.join(low.toDF("label", "up"), "label", "left") \
            .select("u", F.least(key("label"), key("up"))["s"].alias("label")).localCheckpoint()
        changed = jumped.join(labels.toDF("u", "before"), "u").where(F.col("label") != F.col("before")).count()
        labels = jumped
        if not changed:
            break
    return labels.select(F.col("u").alias("post_id"), F.col("label").alias("canonical"))


def find_duplicates(spark: SparkSession, images: DataFrame, d) -> tuple[DataFrame, dict, list[DataFrame]]:
    """(duplicates in the DUPLICATES schema, the search's figures: which search, its candidates,
    the frames it keeps cached for them: unpersist once the duplicates are written). d: the dedup
    settings. The search: exact (multi-index hashing) up to d.exact_max_images unique
    images, locality-sensitive hashing above (d.search forces either)."""
    w = Window.partitionBy("sha256").orderBy(*_order_key())
    ranked = images.select("post_id", "sha256", "phash", "zoom_phash", "phash256") \
        .withColumn("_rn", F.row_number().over(w)).withColumn("_first", F.first("post_id").over(w)).persist()
    reps = ranked.where("_rn = 1").select("post_id", "phash", "zoom_phash", "phash256")
    n = reps.count()
    search = d.search if d.search != "auto" else ("exact" if n <= d.exact_max_images else "lsh")
    hashed = _hashes(reps).persist()
    held = [ranked, hashed]
    if search == "exact":
        candidates = mih_candidates(hashed, d.max_hamming, d.bands).persist()
        figures = {"search": "exact", "candidate_pairs": candidates.count()}
    else:
        candidates, figures, lsh_held = lsh_candidates(spark, hashed, n, d)
        figures = {"search": "lsh", **figures}
        candidates = candidates.persist()
        held += lsh_held
    pairs = verify(candidates, hashed, d.max_hamming, d.verify_bits).persist()
    figures.update(images=n, pairs=pairs.count(), candidates_per_image=round(figures["candidate_pairs"] / max(n, 1), 2))
    near_map = components(pairs).toDF("rep", "canonical").persist()
    held += [candidates, pairs, near_map]
    # Every image maps to its exact group's representative, then to that one's near canonical.
    mapped = (_hashes(ranked, "sha256", F.col("_first").alias("rep"))
              .join(near_map, "rep", "left")
              .withColumn("canonical_post_id", F.coalesce("canonical", "rep")))
    canon = _hashes(images, "sha256").toDF("canonical_post_id", "ch", "cv", "csha")
    dups = (mapped.where(F.col("post_id") != F.col("canonical_post_id")).join(canon, "canonical_post_id")
            .select("post_id", "canonical_post_id",
                    F.when(F.col("sha256") == F.col("csha"), "exact").otherwise("near").alias("kind"),
                    best_pairing("h", "ch").cast("int").alias("hamming")))
    return conform(dups, "duplicates"), figures, held


def dedup(spark: SparkSession, cfg: Config) -> Summary:
    """images -> <lake>/tables/duplicates; unique images are images anti-join duplicates."""
    lake = Lake(cfg.lake)
    out = lake.table("duplicates")
    begin_output(spark, out)
    images = read_table(spark, lake, "images")
    d = cfg.dedup
    dups, figures, held = find_duplicates(spark, images, d)
    write_table(dups.repartition(1).sortWithinPartitions("post_id"), lake, "duplicates")
    for df in held:
        df.unpersist()
    kinds = {r["kind"]: int(r["count"]) for r in spark.read.parquet(out).groupBy("kind").count().collect()}
    n = images.count()
    return Summary(stage="dedup", input_rows=n, output_rows=n - sum(kinds.values()),
                   duplicates={k: kinds.get(k, 0) for k in ("exact", "near")}, output=out,
                   extra={"max_hamming": d.max_hamming, "bands": d.bands, "verify_bits": d.verify_bits,
                          "zooms": list(ZOOMS), **figures})


def unique_images(spark: SparkSession, lake: Lake) -> DataFrame:
    """The images table without the duplicates dedup found."""
    images = read_table(spark, lake, "images")
    dups = read_table(spark, lake, "duplicates").select("post_id")
    return images.join(F.broadcast(dups), "post_id", "left_anti")
