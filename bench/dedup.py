"""Dedup quality and cost: (1) crop-tolerant search on real photos, (2) planted duplicates at scale.

(1) Real photos (../shared/data/photos: 396, no near-duplicates among them) plus one edited
copy of each per kind (crops of 4% and 5% per side, random crops of 0-5% per side, re-encodes,
rescales, brightness), through ingest -> prepare_images -> dedup as jobs. Recall per kind
against today's rule (the whole image's 64-bit pHash alone, same threshold, all pairs);
precision; the rate of unrelated pairs within the threshold before and after the 256-bit
verification, and what it means for 1M images; hashing cost per image against today's.

(2) Benchmark 3 of image preparation (issue 3):

On a generated sample (planted exact and near duplicates: re-encodes, resizes, light crops)
we run ingest -> prepare_images -> dedup as jobs, then score the duplicates table against
the ground truth: a planted pair is found when both posts end in the same group; a reported
duplicate is correct when its canonical post is in its planted group.

Baseline, same run, same accepted images: the `imagehash` library's pHash in a plain loop over
the original files, then an all-pairs comparison (vectorised with numpy, one row at a time,
which is far faster than a pure-Python double loop) at the same threshold.

    .venv/bin/python bench/dedup.py [--posts 10000] [--size 320]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _common import CACHE, ROOT, header, run_job

import cv2  # noqa: E402
import imagehash  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.sparse import coo_matrix  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402

from core.config import Sample  # noqa: E402
from sparkml.images.phash import WORDS_256, ZOOMS, hash_base, phash, thumb32, zoom_hashes  # noqa: E402
from sparkml.sample.make_sample import generate
from sparkml.sample.near_duplicates import EDITS, write_near_duplicates# noqa: E402

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def groups_from_pairs(ids: list[str], pairs: list[tuple[str, str]]) -> dict[str, int]:
    pos = {x: i for i, x in enumerate(ids)}
    pairs = [(a, b) for a, b in pairs if a in pos and b in pos]
    g = coo_matrix((np.ones(len(pairs)), ([pos[a] for a, _ in pairs], [pos[b] for _, b in pairs])),
                   shape=(len(ids), len(ids)))
    _, label = connected_components(g, directed=False)
    return {x: int(label[i]) for i, x in enumerate(ids)}


def score(kind_pairs: dict[str, list[tuple[str, str]]], truth_groups: dict[str, int],
          found_groups: dict[str, int], reported: list[tuple[str, str]]) -> dict:
    out = {}
    for kind, pairs in kind_pairs.items():
        pairs = [(a, b) for a, b in pairs if a in found_groups and b in found_groups]
        hit = sum(found_groups[a] == found_groups[b] for a, b in pairs)
        out[f"{kind}_recall"] = hit / len(pairs) if pairs else float("nan")
        out[f"{kind}_planted"] = len(pairs)
    good = sum(truth_groups[a] == truth_groups[c] for a, c in reported)
    out["reported"] = len(reported)
    out["precision"] = good / len(reported) if reported else float("nan")
    return out


def all_pairs(hashes: np.ndarray, max_hamming: int) -> list[tuple[int, int]]:
    """Every pair (i < j) within max_hamming bits: N rows of an XOR + popcount against the rest."""
    b = hashes.view(np.uint8).reshape(-1, 8)
    found = []
    for i in range(len(hashes) - 1):
        d = POPCOUNT[b[i + 1:] ^ b[i]].sum(axis=1)
        found += [(i, i + 1 + j) for j in np.flatnonzero(d <= max_hamming)]
    return found


PHOTOS = ROOT.parent / "shared" / "data" / "photos"
PAIRINGS = [(0, 0)] + [(k, 0) for k in range(1, len(ZOOMS))] + [(0, k) for k in range(1, len(ZOOMS))]


def _lumas(images_table: Path) -> tuple[list[str], list[np.ndarray]]:
    t = pq.read_table(images_table, columns=["post_id", "image"])
    return t.column("post_id").to_pylist(), [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)
                                             for b in t.column("image").to_pylist()]


def hashing_cost(lumas: list[np.ndarray], repeat: int = 5) -> tuple[float, float]:
    """Seconds per image (best of `repeat`), batches of 64 as in prepare_images: today's hash
    (32x32 thumbnail + 64-bit pHash) and ours (hash base + every zoom's 64- and 256-bit hash)."""
    def today(batch):
        phash(np.stack([thumb32(y) for y in batch]))

    def ours(batch):
        zoom_hashes(np.stack([hash_base(y) for y in batch]))

    out = []
    for fn in (today, ours, today, ours):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for i in range(0, len(lumas), 64):
                fn(lumas[i:i + 64])
            best = min(best, time.perf_counter() - t0)
        out.append(best / len(lumas))
    return min(out[0], out[2]), min(out[1], out[3])


def real_photo_crops(max_hamming: int, verify_bits: int) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    header(f"dedup on {len(photos)} real photos + one copy of each per edit {EDITS}")
    out = CACHE / "dedup-real"
    truth = write_near_duplicates(photos, out / "set", seed=1)
    manifest, lake = out / "set" / "manifest.jsonl", out / "lake"
    for stage in ("ingest", "prepare_images"):
        run_job(stage, lake, "local[2]", manifest)
    found, runs = {}, {}
    # the exact search (what dedup.search=auto does at this size), then the approximate one with the
    # tables it would use for 1M images (k, L from dedup.lsh_images): the recall a 1M run gets
    for search, extra in (("exact", ()), ("lsh", ("dedup.lsh_images=1000000",))):
        runs[search] = run_job("dedup", lake, "local[2]", manifest, f"dedup.max_hamming={max_hamming}",
                               f"dedup.verify_bits={verify_bits}", f"dedup.search={search}", *extra)
        found[search] = pq.read_table(lake / "tables" / "duplicates").to_pylist()
    s, dups = runs["exact"], found["exact"]
    src = {p: t["of"] or p for p, t in truth.items()}

    def grouping(dups):
        canonical = {d["post_id"]: d["canonical_post_id"] for d in dups}
        return {p: canonical.get(p, p) for p in truth}

    group, group_lsh = grouping(dups), grouping(found["lsh"])
    t = pq.read_table(lake / "tables" / "images", columns=["post_id", "phash", "zoom_phash", "phash256"]).to_pylist()
    ids = [r["post_id"] for r in t]
    h64 = np.array([[r["phash"]] + r["zoom_phash"] for r in t], np.int64).view(np.uint8).reshape(len(t), -1, 8)
    h256 = np.array([r["phash256"] for r in t], np.int64).view(np.uint8).reshape(len(t), -1, 8 * WORDS_256)
    pos = {p: i for i, p in enumerate(ids)}

    def best(i, j_idx):  # (best 64-bit distance, 256-bit distance of that pairing) of i against rows j_idx
        d64 = np.stack([POPCOUNT[h64[j_idx, b] ^ h64[i, a]].sum(-1, dtype=np.int64) for a, b in PAIRINGS])
        k = d64.argmin(0)
        d256 = np.array([POPCOUNT[h256[j, PAIRINGS[q][1]] ^ h256[i, PAIRINGS[q][0]]].sum(dtype=np.int64)
                         for j, q in zip(j_idx, k)]) if len(j_idx) else np.zeros(0, np.int64)
        whole = POPCOUNT[h64[j_idx, 0] ^ h64[i, 0]].sum(-1, dtype=np.int64)
        return d64.min(0), d256, whole

    lsh = runs["lsh"]
    print(f"{len(ids)} images, max_hamming {max_hamming}, verify_bits {verify_bits}, zooms {list(ZOOMS)}; lsh with "
          f"the tables of 1M images: {lsh['bits']} bits x {lsh['tables']} tables, recall target {lsh.get('recall', 0.97)}")
    print("| edit | copies | recall, exact search | recall, lsh (1M tables) | recall, whole-image pHash only | "
          "64-bit distance of the pair (count) | 256-bit distance p95 / max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in EDITS:
        copies = [p for p, v in truth.items() if v["kind"] == kind]
        ours = np.mean([group[p] == group[src[p]] for p in copies])
        approx = np.mean([group_lsh[p] == group_lsh[src[p]] for p in copies])
        d = [best(pos[src[p]], np.array([pos[p]])) for p in copies]
        whole = np.mean([x[2][0] <= max_hamming for x in d])
        d256 = [int(x[1][0]) for x in d if x[0][0] <= max_hamming]
        spread = ", ".join(f"{b}: {c}" for b, c in sorted(Counter(int(x[0][0]) for x in d).items()))
        print(f"| {kind} | {len(copies)} | {ours:.3f} | {approx:.3f} | {whole:.3f} | {spread} | "
              f"{np.percentile(d256, 95):.0f} / {max(d256)} |")
    for search in ("exact", "lsh"):
        reported = [(d["post_id"], d["canonical_post_id"]) for d in found[search]]
        good = sum(src[a] == src[c] for a, c in reported)
        print(f"precision, {search}: {good} of {len(reported)} reported duplicates are copies of their canonical "
              f"({good / max(1, len(reported)):.4f}); {runs[search]['candidate_pairs']} candidates, "
              f"{runs[search]['seconds']:.1f} s")
    # Unrelated pairs: every pair of images of different source photos.
    hist64, passed, n_pairs = np.zeros(65, np.int64), {}, 0
    src_idx = np.array([src[p] for p in ids])
    for i in range(len(ids) - 1):
        j = np.arange(i + 1, len(ids))
        j = j[src_idx[j] != src_idx[i]]
        m = np.stack([POPCOUNT[h64[j, b] ^ h64[i, a]].sum(-1, dtype=np.int64) for a, b in PAIRINGS]).min(0)
        hist64 += np.bincount(m, minlength=65)
        n_pairs += len(j)
        near = j[m <= 12]
        if len(near):
            mm, d256, _ = best(i, near)
            for t_ in (6, 8, 10, 12):
                passed[t_] = passed.get(t_, 0) + int(((mm <= t_) & (d256 <= verify_bits)).sum())
    cum = np.cumsum(hist64)
    print(f"unrelated pairs: {n_pairs}; within t bits at the best zoom pairing (64-bit only / after 256-bit "
          f"verification <= {verify_bits}):")
    for t_ in (6, 8, 10, 12):
        print(f"  t={t_}: {int(cum[t_])} / {passed.get(t_, 0)}  (rate {cum[t_] / n_pairs:.2e} / "
              f"{passed.get(t_, 0) / n_pairs:.2e})")
    pairs_1m = 1e6 * (1e6 - 1) / 2
    k = int(cum[max_hamming])
    bound = max(k, 3) / n_pairs  # 3: the 95% upper bound of a Poisson count of 0
    print(f"at 1M images ({pairs_1m:.1e} pairs), 64-bit only at t={max_hamming}: observed rate {k / n_pairs:.1e} "
          f"(95% bound {bound:.1e}) -> up to {bound * pairs_1m:,.0f} false pairs against ~17,000 true re-uploads")
    # The tail: the counts within 10 and 12 bits grow by a factor g per 2 bits; extrapolated down to
    # max_hamming, times the share of close unrelated pairs (<= 12 bits) that pass verification
    # (its 95% bound when none does).
    c10, c12 = max(int(cum[10]), 1), int(cum[12])
    g = c12 / c10
    tail = c10 / g ** ((10 - max_hamming) / 2) / n_pairs
    close = max(c12, 1)
    share = max(passed.get(12, 0), 3) / close
    print(f"  tail extrapolation: x{g:.1f} per 2 bits -> rate at t={max_hamming} ~{tail:.1e} "
          f"(~{tail * pairs_1m:,.0f} false candidate pairs at 1M); verification passes {passed.get(12, 0)} of "
          f"{c12} unrelated pairs within 12 bits (95% bound {share:.1%}) -> ~{tail * share * pairs_1m:,.0f} "
          f"false pairs at 1M or fewer")
    lumas = _lumas(lake / "tables" / "images")[1]
    today, ours = hashing_cost(lumas)
    print(f"hashing per image: today's {today * 1e6:.1f} us, ours {ours * 1e6:.1f} us ({ours / today:.2f}x); "
          f"dedup job {s['seconds']:.1f} s, {s['candidate_pairs']} candidates")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=10000)
    ap.add_argument("--size", type=int, default=320, help="side of the generated images")
    ap.add_argument("--max-hamming", type=int, default=6)
    ap.add_argument("--verify-bits", type=int, default=80)
    ap.add_argument("--real-only", action="store_true", help="only part (1), the real photos")
    args = ap.parse_args()
    real_photo_crops(args.max_hamming, args.verify_bits)
    if args.real_only:
        return
    header(f"dedup: planted duplicates and cost, {args.posts} posts, vs imagehash loop + all-pairs")
    out = CACHE / f"dedup-{args.posts}-{args.size}"
    if not (out / "ground_truth.json").exists():
        generate(Sample(out=str(out), posts=args.posts, seed=3, size=args.size, workers=2))
    truth = json.loads((out / "ground_truth.json").read_text())
    manifest, lake = out / "manifest.jsonl", out / "lake"
    for stage in ("ingest", "prepare_images"):
        run_job(stage, lake, "local[2]", manifest)
    s = run_job("dedup", lake, "local[2]", manifest, f"dedup.max_hamming={args.max_hamming}")
    images = pq.read_table(lake / "tables" / "images", columns=["post_id"]).column("post_id").to_pylist()
    dups = pq.read_table(lake / "tables" / "duplicates").to_pylist()
    n = len(images)

    kind_pairs = {k: [(c["post_id"], c["of"]) for c in truth["planted"] if c["kind"] == f"{k}_duplicate"]
                  for k in ("exact", "near")}
    truth_groups = groups_from_pairs(images, kind_pairs["exact"] + kind_pairs["near"])
    ours_groups = groups_from_pairs(images, [(d["post_id"], d["canonical_post_id"]) for d in dups])
    ours = score(kind_pairs, truth_groups, ours_groups, [(d["post_id"], d["canonical_post_id"]) for d in dups])
    # Our hashes are made inside prepare_images from the resized pixels; time that part alone
    # (gray 32x32 + batched DCT pHash) on the prepared images, decoded outside the clock.
    pix = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
           for b in pq.read_table(lake / "tables" / "images", columns=["image"]).column("image").to_pylist()]
    t0 = time.perf_counter()
    zoom_hashes(np.stack([hash_base(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)) for a in pix]))
    ours["hash_seconds"] = time.perf_counter() - t0
    del pix
    ours["seconds"] = s["seconds"]
    ours["candidate_pairs"] = s["candidate_pairs"]

    # Baseline: imagehash pHash over the same accepted images, from the original files.
    paths = {json.loads(line)["post_id"]: json.loads(line)["image"] for line in open(manifest) if line.strip()}
    t0 = time.perf_counter()
    hashes = []
    for pid in images:
        h = imagehash.phash(Image.open(out / paths[pid]))
        hashes.append(int(str(h), 16))
    t_hash = time.perf_counter() - t0
    arr = np.array(hashes, dtype=np.uint64)
    t0 = time.perf_counter()
    pairs = all_pairs(arr, args.max_hamming)
    t_pairs = time.perf_counter() - t0
    base_pairs = [(images[i], images[j]) for i, j in pairs]
    base_groups = groups_from_pairs(images, base_pairs)
    canon: dict[int, str] = {}
    for pid in sorted(images, key=lambda x: (len(x), x)):
        canon.setdefault(base_groups[pid], pid)
    base_reported = [(p, canon[base_groups[p]]) for p in images if canon[base_groups[p]] != p]
    base = score(kind_pairs, truth_groups, base_groups, base_reported)
    base.update(hash_seconds=t_hash, pairs_seconds=t_pairs, seconds=t_hash + t_pairs)

    per10k = 10000 / n
    print(f"{n} prepared images, threshold {args.max_hamming} bits")
    for name, r in (("ours (dedup job, local[2])", ours), ("imagehash loop + all-pairs", base)):
        print(f"  {name:28s} exact recall {r['exact_recall']:.3f} ({r['exact_planted']}) | near recall "
              f"{r['near_recall']:.3f} ({r['near_planted']}) | precision {r['precision']:.3f} of {r['reported']} reported")
    total = ours["seconds"] + ours["hash_seconds"]
    print(f"  time: ours {total:.1f} s ({total * per10k:.1f} s per 10k: hashing inside prepare_images "
          f"{ours['hash_seconds']:.1f} s, dedup job {ours['seconds']:.1f} s; {ours['candidate_pairs']} candidate "
          f"pairs verified of {n * (n - 1) // 2} possible)")
    print(f"        baseline {base['seconds']:.1f} s ({base['seconds'] * per10k:.1f} s per 10k: hashing "
          f"{t_hash:.1f} s, all-pairs {t_pairs:.1f} s; all-pairs grows as N^2: x{(1e6 / n) ** 2:.0f} at 1M)")
    print(f"  ratio baseline / ours: {base['seconds'] / total:.2f}x")
    print(json.dumps({"images": n, "ours": ours, "baseline": base}, indent=1))


if __name__ == "__main__":
    main()
