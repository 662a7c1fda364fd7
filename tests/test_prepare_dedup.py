import numpy as np
import pandas as pd
import pytest

from core.lake import read_summary
from core.schemas import SPLITS
from sparkml.images.dedup import _hashes, band_bounds, candidate_pairs, components, lsh_candidates, lsh_params, probe_masks, verify
from sparkml.images.phash import ZOOMS, hamming
from sparkml.sample.make_sample import MANIFEST
from tests.conftest import ROOT, planted, rejects_by_reason, run_job


def test_bands_and_masks():
    assert band_bounds(4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert sum(hi - lo for lo, hi in band_bounds(7)) == 64
    assert probe_masks(16, 0) == [0]
    assert len(probe_masks(16, 1)) == 17 and len(probe_masks(16, 2)) == 1 + 16 + 120


def test_components_are_found_on_the_executors(spark):
    """The lowest post_id of each connected component (numeric ids by value), also along a chain
    longer than the rounds of plain label propagation would settle in."""
    chain = [(f"c{i}", f"c{i + 1}") for i in range(40)]
    edges = spark.createDataFrame([("10", "9"), ("9", "300"), ("7", "8")] + chain, "a string, b string")
    got = {r.post_id: r.canonical for r in components(edges).collect()}
    want = {"9": "9", "10": "9", "300": "9", "7": "7", "8": "7", **{f"c{i}": "c0" for i in range(41)}}
    assert got == want


@pytest.mark.parametrize("t, bands", [(6, 4), (3, 4), (8, 3)])
def test_band_search_finds_every_pair_a_brute_force_finds(spark, t, bands):
    rng = np.random.default_rng(t)
    def signed(u: int) -> int:
        return u - (1 << 64) if u >= 1 << 63 else u

    base = [int.from_bytes(rng.bytes(8), "big") for _ in range(60)]
    hashes = list(base)
    for h in base[:40]:  # neighbours at distance 0..t+2 of some hashes
        flips = rng.choice(64, int(rng.integers(0, t + 3)), replace=False)
        hashes.append(h ^ sum(1 << int(f) for f in flips))
    # one "zoom" hash per image too, some near another image's whole-image hash
    zooms = [int.from_bytes(rng.bytes(8), "big") for _ in hashes]
    for k in range(0, 40, 3):
        zooms[k] = hashes[k + 50] ^ (1 << int(rng.integers(64)))
    rows = [(f"p{i}", signed(h), [signed(z)], [0] * 8) for i, (h, z) in enumerate(zip(hashes, zooms))]
    reps = spark.createDataFrame(rows, "post_id string, phash long, zoom_phash array<long>, phash256 array<long>")
    pairs, _ = candidate_pairs(reps, t, bands, verify_bits=0)
    found = {(r.a, r.b): r.hamming for r in pairs.collect()}

    def best(i, j):  # whole with whole, or a zoom of one with the whole other
        return min(hamming(hashes[i], hashes[j]), hamming(zooms[i], hashes[j]), hamming(hashes[i], zooms[j]))

    brute = {tuple(sorted((f"p{i}", f"p{j}"))): best(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
             if best(i, j) <= t}
    assert found == brute and len(brute) > 10
    assert any(hamming(hashes[int(a[1:])], hashes[int(b[1:])]) > t for a, b in brute)  # found through a zoom


def _hash_rows(spark, hashes, zooms):
    def signed(u: int) -> int:
        return u - (1 << 64) if u >= 1 << 63 else u

    rows = [(f"p{i}", signed(h), [signed(z)], [0] * 8) for i, (h, z) in enumerate(zip(hashes, zooms))]
    return spark.createDataFrame(rows, "post_id string, phash long, zoom_phash array<long>, phash256 array<long>")


def test_lsh_finds_pairs_at_every_distance_up_to_the_threshold_through_zooms_too(spark):
    """The approximate search, its tables sized for recall 0.9999, on hashes 0..6 bits apart (and
    zooms near another image's whole hash, as crops and frames are): every pair a brute force
    finds, nothing else; tables sized for 1M images (23 bits) find them too."""
    from core.config import Dedup

    rng = np.random.default_rng(5)
    base = [int.from_bytes(rng.bytes(8), "big") for _ in range(80)]
    hashes = list(base)
    for i, h in enumerate(base[:56]):  # eight neighbours at each distance 0..6
        flips = rng.choice(64, i % 7, replace=False)
        hashes.append(h ^ sum(1 << int(f) for f in flips))
    zooms = [int.from_bytes(rng.bytes(8), "big") for _ in hashes]
    for k in range(0, 60, 4):
        zooms[k] = hashes[k + 70] ^ (1 << int(rng.integers(64)))
    reps = _hash_rows(spark, hashes, zooms)
    brute = {}
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            d = min(hamming(hashes[i], hashes[j]), hamming(zooms[i], hashes[j]), hamming(hashes[i], zooms[j]))
            if d <= 6:
                brute[tuple(sorted((f"p{i}", f"p{j}")))] = d
    assert set(brute.values()) == set(range(7)) and len(brute) > 60
    for images in (None, 1_000_000):
        d = Dedup(search="lsh", recall=0.9999, lsh_images=images)
        candidates, figures, _ = lsh_candidates(spark, _hashes(reps), len(hashes), d)
        found = {(r.a, r.b): r.hamming for r in verify(candidates, _hashes(reps), 6, 256).collect()}
        assert found == brute, (figures, set(brute) - set(found))
    assert figures["bits"] == lsh_params(1_000_000 * len(ZOOMS), 6, 0.9999, 100)[0] > 16  # 3 hashes an image


def test_a_crowded_bucket_is_split_not_paired_whole(spark):
    """2,000 images whose hashes agree on all but 24 bit positions share most tables' keys: those
    buckets are split by further bits (or paired by a window) so the candidates stay bounded, and
    the pairs within 6 bits are found all the same (their share is what the split costs)."""
    import time

    from core.config import Dedup

    rng = np.random.default_rng(9)
    free = rng.choice(63, 24, replace=False)
    base = int.from_bytes(rng.bytes(8), "big")
    hashes = [base ^ sum(1 << int(f) for f in free if rng.uniform() < 0.5) for _ in range(2000)]
    reps = _hash_rows(spark, hashes, hashes)
    d = Dedup(search="lsh", bucket_cap=50)
    t0 = time.perf_counter()
    candidates, figures, _ = lsh_candidates(spark, _hashes(reps), len(hashes), d)
    found = verify(candidates, _hashes(reps), 6, 256).count()
    seconds = time.perf_counter() - t0
    assert figures["buckets_split"] > 0 and seconds < 120
    # no more than each row paired with `cap` others in each of its tables
    assert figures["candidate_pairs"] <= len(hashes) * 2 * figures["tables"] * 2 * 50
    h = np.array(hashes, dtype=np.uint64)
    within = sum(int((np.unpackbits((h[i] ^ h[i + 1:]).view(np.uint8).reshape(-1, 8), axis=1).sum(1) <= 6).sum())
                 for i in range(len(h) - 1))
    assert within > 1000 and found >= 0.5 * within, (found, within, figures)


def test_a_bucket_no_sub_key_separates_is_paired_within_a_window():
    """300 rows of one hash (plain white images hash alike): no further bits split them, so each
    row is paired only with the bucket_cap rows after it, both ways, and nothing else."""
    import pyarrow as pa

    from sparkml.images.dedup import lsh_pairs, table_positions

    n, cap = 300, 50
    batch = pa.RecordBatch.from_pydict({"t": np.zeros(n, np.int16), "key": np.zeros(n, np.int64),
                                        "id": np.arange(n, dtype=np.int64), "level": np.zeros(n, np.int8),
                                        "h": np.full(n, 12345, np.int64)})
    out = list(lsh_pairs([batch], table_positions(1, 0), 16, cap, 6))
    stats, found = out[-1].to_pydict(), pa.Table.from_batches(out[:-1]).to_pydict()
    window = 2 * sum(n - offset for offset in range(1, cap + 1))  # ordered pairs at most cap apart
    assert stats["t"] == [-1] and stats["n"] == [window] and stats["b"] == [n]  # every row windowed
    pairs = list(zip(found["a"], found["b"]))
    assert len(pairs) == len(set(pairs)) == window and all(0 < abs(a - b) <= cap for a, b in pairs)


def test_prepare_accounts_and_rejects_with_reasons(spark, prepared):
    lake, truth = prepared
    s = read_summary(spark, lake.table("images"))
    posts = read_summary(spark, lake.table("posts"))
    assert s["balanced"] and s["input_rows"] == posts["output_rows"]
    by_reason = rejects_by_reason(spark, lake, "prepare_images")
    assert by_reason == {
        "truncated_image": {c["post_id"] for c in planted(truth, "truncated")},
        "not_an_image": {c["post_id"] for c in planted(truth, "not_an_image")},
        "decompression_bomb": {c["post_id"] for c in planted(truth, "decompression_bomb")},
    }
    images = spark.read.parquet(lake.table("images"))
    assert images.count() == s["output_rows"] and s["reoriented"] == len(planted(truth, "exif_rotated"))
    assert s["formats"]["png"] == 3 and s["formats"]["gif"] == 1 and s["formats"]["webp"] == 1
    assert s["modes"]["CMYK"] == 2 and s["modes"]["L"] == 2
    one = images.where("format = 'jpeg'").first()
    assert bytes(one.image)[:3] == b"\xff\xd8\xff" and len(one.sha256) == 64


def test_dedup_finds_planted_duplicates(spark, prepared):
    lake, truth = prepared
    s = read_summary(spark, lake.table("duplicates"))
    assert s["balanced"] and s["input_rows"] == s["output_rows"] + s["duplicates"]["exact"] + s["duplicates"]["near"]
    dups = spark.read.parquet(lake.table("duplicates")).toPandas()
    found = set(zip(dups.post_id, dups.canonical_post_id))
    exact = {(c["post_id"], c["of"]) for c in planted(truth, "exact_duplicate")}
    near = {(c["post_id"], c["of"]) for c in planted(truth, "near_duplicate")}
    assert exact <= found  # exact recall 1.0
    assert len(near & found) / len(near) >= 0.95
    assert len(found & (exact | near)) / len(found) >= 0.99
    assert set(dups.loc[dups.post_id.isin([p for p, _ in exact]), "kind"]) == {"exact"}
    assert (dups.loc[dups.kind == "exact", "hamming"] == 0).all()
    assert dups.loc[dups.kind == "near", "hamming"].between(0, 6).all()
    assert s["candidate_pairs"] < 0.05 * s["input_rows"] ** 2 / 2  # not all pairs


def test_dedup_rerun_is_identical(spark, prepared, sample):
    lake, truth = prepared
    root, _ = sample
    before = spark.read.parquet(lake.table("duplicates")).toPandas().sort_values("post_id").reset_index(drop=True)
    assert run_job("dedup", "--set", f"lake={lake.root}", "--set", f"source.path={root / MANIFEST}") == 0
    after = spark.read.parquet(lake.table("duplicates")).toPandas().sort_values("post_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_downstream_refuses_missing_upstream(spark, tmp_path, capsys):
    assert run_job("dedup", "--set", f"lake={tmp_path}") == 2
    assert "run jobs/prepare_images.py first" in capsys.readouterr().err


def test_petastorm_dataset_round_trips(spark, prepared):
    import json

    from petastorm import make_reader

    lake, truth = prepared
    assert run_job("build_dataset", "--set", f"lake={lake.root}", "--set", "dataset.ranks=2",
                   "--set", "dataset.row_groups_per_rank=3") == 0
    root = lake.dataset("cities")
    s = read_summary(spark, root)
    dups = set(spark.read.parquet(lake.table("duplicates")).toPandas().post_id)
    images = set(spark.read.parquet(lake.table("images")).select("post_id").toPandas().post_id) - dups
    with_city = images & set(truth["labels"])  # the '#me' posts have no city
    assert s["balanced"] and s["input_rows"] == len(images) and s["output_rows"] == len(with_city)
    assert s["rejected"] == {"no_label": len(images & set(truth["me"]))}
    unique = len(with_city)
    assert sum(s["splits"].values()) == unique and s["splits"]["train"] > s["splits"]["test"] > 0
    labels = json.loads(open(root[len("file://"):] + "/labels.json").read())
    seen = {}
    for split in SPLITS:
        with make_reader(f"{root}/{split}", num_epochs=1, workers_count=2) as reader:
            for row in reader:
                assert row.image.shape == (300, 300, 3) and row.image.dtype == np.uint8
                assert labels[row.label] == row.city
                seen[row.post_id] = (row.city, split)
    assert len(seen) == unique
    for pid, (city, _) in seen.items():
        assert truth["labels"][pid]["city"] == city
    assert not dups & set(seen)
    train = spark.read.parquet(f"{root}/train")  # plain Spark reads it too
    assert train.count() == s["splits"]["train"]
    import pyarrow.parquet as pq
    groups = sum(pq.ParquetFile(f).num_row_groups for f in pq.ParquetDataset(f"{root[len('file://'):]}/train").files)
    assert groups >= 2 * 3
    # the split is a function of post_id: rebuilding gives the same membership
    assert run_job("build_dataset", "--set", f"lake={lake.root}", "--set", "dataset.ranks=2") == 0
    again = set(spark.read.parquet(f"{root}/test").toPandas().post_id)
    assert again == {p for p, (_, sp) in seen.items() if sp == "test"}


@pytest.mark.slow
def test_dataset_shape_comes_from_the_images_table_not_the_current_config(spark, sample, tmp_path):
    from petastorm import make_reader
    from petastorm.etl.dataset_metadata import get_schema_from_dataset_url

    root, truth = sample
    common = ["--set", f"lake={tmp_path}", "--set", f"source.path={root / MANIFEST}"]
    for job in ("ingest", "prepare_images", "dedup"):
        assert run_job(job, *common, "--set", "prepare.size=64") == 0, job
    assert run_job("build_dataset", *common, "--set", "dataset.ranks=1") == 0  # prepare.size is 300 here
    url = f"file://{tmp_path}/datasets/cities/train"
    assert get_schema_from_dataset_url(url).fields["image"].shape == (64, 64, 3)
    with make_reader(url, num_epochs=1, workers_count=1) as reader:
        assert next(reader).image.shape == (64, 64, 3)


PHOTOS = ROOT.parent / "shared" / "data" / "photos"


@pytest.mark.slow
@pytest.mark.lane35
def test_dedup_finds_cropped_reposts_of_real_photos(spark, tmp_path):
    """Real photos (no near-duplicates among them) with cropped, re-encoded, rescaled and
    brightened copies: every copy is found, nothing unrelated is joined."""
    from sparkml.sample.near_duplicates import write_near_duplicates

    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) == 396, "../shared/data/photos must be beside the repository"
    truth = write_near_duplicates(photos[::10], tmp_path / "set", seed=1)
    common = ["--set", f"lake={tmp_path / 'lake'}", "--set", f"source.path={tmp_path / 'set' / MANIFEST}"]
    for job in ("ingest", "prepare_images", "dedup"):
        assert run_job(job, *common) == 0, job
    dups = spark.read.parquet(f"{tmp_path}/lake/tables/duplicates").toPandas()
    canonical = dict(zip(dups.post_id, dups.canonical_post_id))
    group = {p: canonical.get(p, p) for p in truth}
    for kind in ("crop4", "crop5", "reencode", "rescale", "bright"):
        copies = [p for p, t in truth.items() if t["kind"] == kind]
        assert sum(group[p] == group[truth[p]["of"]] for p in copies) >= 0.95 * len(copies), kind
    originals = [p for p, t in truth.items() if t["of"] is None]
    assert len({group[p] for p in originals}) == len(originals)  # precision: no two photos joined
