"""Near-duplicate search at scale (issue 30): candidate pairs, seconds and peak memory of
jobs/dedup.py on 10k, 100k and 1M images in one run, executors in JVMs of their own
(local-cluster), on this machine.

The images are images, hashed by our own prepare code (sparkml.images.phash: hash_base and
zoom_hashes, what prepare_images computes), not random bit strings: 64 x 64 grey scenes (the
smallest a hash needs: hash_base works on 64..127 px) drawn as photos are shaped, light from
above (a vertical gradient), a few soft blobs, texture at two scales. 1% of them have a near
copy (a crop of 1-5% per side, brightness x0.85-1.15, noise) and 0.5% an exact one (the same
bytes): their recall is measured at each size. Their bit balance (how often each hash bit is
set, how far apart random pairs are, how full the fullest bucket of 16 bits is) is printed
beside the real photos' of ../shared/data/photos (hashed the same way from their prepared
images, tests' and bench/dedup.py's lake).

Every size runs dedup.search=lsh (its tables sized for that size); 10k and 100k also run the
exact search, today's, for its time. Not part of CI.

    .venv/bin/python bench/dedup_scale.py [--sizes 10000 100000 1000000] [--master local-cluster[2,1,6144]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from _common import CACHE, header
from load import submit

WORK = CACHE / "dedup-scale"
SIDE = 64
NEAR, EXACT = 0.01, 0.005  # shares of images with a planted near / exact copy


def scene(rng: np.random.Generator) -> np.ndarray:
    """A 64 x 64 grey 'photo': light from above, soft blobs, coarse and fine texture."""
    import cv2

    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    img = 128 + rng.normal(-50, 40) * (y - 0.5) + rng.normal(0, 25) * (x - 0.5)
    for _ in range(int(rng.integers(1, 6))):
        cy, cx = rng.uniform(0, 1, 2)
        ry, rx = rng.uniform(0.05, 0.4, 2)
        img += rng.normal(0, 60) * np.exp(-(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2))
    for cells, amp in ((4, 30.0), (16, 12.0)):
        grid = rng.normal(0, amp, (cells, cells)).astype(np.float32)
        img += cv2.resize(grid, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).astype(np.uint8)


def edited(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near copy: cropped 1-5% per side (resized back), brighter or darker, a little noise."""
    import cv2

    c = int(round(SIDE * rng.uniform(0.01, 0.05)))
    out = cv2.resize(img[c:SIDE - c, c:SIDE - c], (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    out = out * rng.uniform(0.85, 1.15) + rng.normal(0, 2, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def images(lo: int, hi: int, seed: int):
    """(post_ids, grey images, truth: post_id -> (source, kind)) of images lo..hi-1: image i is a
    scene, or (a share of them) a near or exact copy of image i-1."""
    ids, imgs, truth = [], [], {}
    prev = None
    for i in range(lo, hi):
        rng = np.random.default_rng([seed, i])
        u = rng.uniform()
        if prev is not None and u < NEAR:
            img, truth[f"g{i}"] = edited(prev, rng), (f"g{i - 1}", "near")
        elif prev is not None and u < NEAR + EXACT:
            img, truth[f"g{i}"] = prev.copy(), (f"g{i - 1}", "exact")
        else:
            img = scene(rng)
        ids.append(f"g{i}")
        imgs.append(img)
        prev = img
    return ids, imgs, truth


def hash_rows(lo: int, hi: int, seed: int) -> dict:
    from sparkml.images.phash import hash_base, zoom_hashes

    ids, imgs, truth = images(lo, hi, seed)
    h64, h256 = zoom_hashes(np.stack([hash_base(im.astype(np.float32)) for im in imgs]))
    return {"post_id": ids, "sha256": [hashlib.sha256(im.tobytes()).hexdigest() for im in imgs],
            "phash": h64[:, 0].tolist(), "zoom_phash": h64[:, 1:].tolist(), "phash256": h256.tolist(),
            "truth": truth}


def make_lake(n: int, seed: int = 7) -> tuple[Path, dict]:
    """<WORK>/n<N>/lake with tables/images (the hashes dedup reads) and its summary; the planted
    copies' truth. Kept and reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = WORK / f"n{n}"
    lake, truth_file = root / "lake", root / "truth.json"
    table = lake / "tables" / "images"
    if truth_file.exists() and (table / "_SUMMARY.json").exists():
        return lake, json.loads(truth_file.read_text())
    shutil.rmtree(root, ignore_errors=True)
    table.mkdir(parents=True)
    t0 = time.perf_counter()
    from concurrent.futures import ProcessPoolExecutor

    chunk = 20_000
    truth: dict = {}
    with ProcessPoolExecutor(2) as pool:
        for j, rows in enumerate(pool.map(hash_rows, range(0, n, chunk), [min(n, i + chunk) for i in range(0, n, chunk)],
                                          [seed] * len(range(0, n, chunk)))):
            truth.update(rows.pop("truth"))
            pq.write_table(pa.table(rows), table / f"part-{j:05d}.parquet")
    (table / "_SUMMARY.json").write_text(json.dumps({"stage": "prepare_images", "input_rows": n, "output_rows": n,
                                                     "run_id": f"bench-{n}", "size": SIDE, "balanced": True}))
    truth_file.write_text(json.dumps(truth))
    print(f"# {n:,} images drawn and hashed in {time.perf_counter() - t0:.0f} s -> {table}", flush=True)
    return lake, truth


def balance(h: np.ndarray, label: str, rng: np.random.Generator) -> None:
    """How evenly spread whole-image hashes are: per-bit share of ones, distances of random pairs,
    and the fullest bucket of a random 16-bit key against the even expectation."""
    from sparkml.images.dedup import BITS, keys, popcount

    bits = ((h[:, None] >> np.arange(BITS)) & 1).astype(np.float64)
    share = bits.mean(0)
    i, j = rng.integers(0, len(h), (2, 20000))
    d = popcount(h[i] ^ h[j])
    pos = rng.permutation(BITS)[:16]
    _, counts = np.unique(keys(h, pos), return_counts=True)
    print(f"| {label} | {len(h):,} | {share.min():.2f}-{share.max():.2f} | {share.std():.3f} | {d.mean():.1f} | "
          f"{np.percentile(d, 1):.0f} | {(d <= 16).mean():.4f} | {counts.max()} ({counts.max() / (len(h) / 2**16):.0f}x "
          f"even) |")


def run_dedup(lake: Path, master: str, search: str, log: Path) -> dict:
    r = submit(["jobs/dedup.py", "--config", "conf/local.yaml", "--set", f"lake={lake}", "--set",
                f"dedup.search={search}", "--set", "source.path=.", "--set", "progress.interval=0",
                "--set", "spark.sql.shuffle.partitions=64"], log, master, driver_memory="4g")
    return {**r, "summary": json.loads((lake / "tables" / "duplicates" / "_SUMMARY.json").read_text())}


def recall(lake: Path, truth: dict) -> dict:
    import pyarrow.parquet as pq

    dups = pq.read_table(lake / "tables" / "duplicates").to_pylist()
    canonical = {d["post_id"]: d["canonical_post_id"] for d in dups}
    out = {}
    for kind in ("near", "exact"):
        planted = [(p, s) for p, (s, k) in truth.items() if k == kind]
        out[kind] = np.mean([canonical.get(p, p) == canonical.get(s, s) for p, s in planted]) if planted else None
    src = {p: s for p, (s, _) in truth.items()}

    def origin(p):  # a copy of a copy: its scene
        while p in src:
            p = src[p]
        return p

    bad = sum(origin(p) != origin(c) for p, c in canonical.items())
    out["precision"] = 1 - bad / max(1, len(canonical))
    out["reported"] = len(canonical)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--exact-up-to", type=int, default=100_000, help="also run the exact search up to this size")
    ap.add_argument("--master", default="local-cluster[2,1,6144]")
    args = ap.parse_args()
    header(f"dedup at scale: {', '.join(f'{n:,}' for n in args.sizes)} generated images, {args.master}")
    rng = np.random.default_rng(0)
    import pyarrow.parquet as pq

    lakes = {n: make_lake(n) for n in args.sizes}
    print("\nBit balance of the whole-image 64-bit hashes (bit 63, the DC coefficient, left out):")
    print("| hashes of | images | share of ones per bit, min-max | its std | mean distance of random pairs | "
          "1st percentile | pairs within 16 bits | fullest 16-bit bucket |")
    print("|---|---|---|---|---|---|---|---|")
    real = CACHE / "dedup-real" / "lake" / "tables" / "images"
    if real.exists():
        t = pq.read_table(real, columns=["post_id", "phash"]).to_pandas()
        balance(t.phash[~t.post_id.str.contains("-")].to_numpy(np.int64), "real photos (../shared/data/photos)", rng)
    for n, (lake, _) in lakes.items():
        h = pq.read_table(lake / "tables" / "images", columns=["phash"]).column("phash").to_numpy()
        balance(h.astype(np.int64), f"generated, {n:,}", rng)

    print("\n| images | search | bits x tables | candidate pairs | per image | pairs found | seconds (job) | "
          "per 1k images | near recall | exact recall | precision | driver JVM live heap | driver Python | "
          "executor JVMs (sum) | executor Python (sum) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for n, (lake, truth) in lakes.items():
        for search in ("lsh", "exact") if n <= args.exact_up_to else ("lsh",):
            r = run_dedup(lake, args.master, search, WORK / f"dedup-{search}-{n}.log")
            s, q = r["summary"], recall(lake, truth)
            results.append({"n": n, "search": search, **{k: v for k, v in r.items() if k != "summary"}, "summary": s,
                            "quality": q})
            gib, mib = 2**30, 2**20
            print(f"| {n:,} | {search} | {s.get('bits', '-')} x {s.get('tables', '-')} | {s['candidate_pairs']:,} | "
                  f"{s['candidates_per_image']} | {s['pairs']:,} | {s['seconds']:.0f} | {s['seconds'] * 1000 / n:.2f} | "
                  f"{q['near']:.3f} | {q['exact']:.3f} | {q['precision']:.4f} | {r['heap_after_gc'] / gib:.2f} GiB | "
                  f"{r['driver_python'] / mib:.0f} MiB | {r['executor_jvm_sum'] / gib:.2f} GiB | "
                  f"{r['executor_python_sum'] / mib:.0f} MiB |", flush=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
