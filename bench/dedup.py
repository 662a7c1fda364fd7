"""Benchmark 3 of image preparation (issue 3): dedup quality and cost.

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

import numpy as np
from _common import CACHE, header, run_job

import cv2  # noqa: E402
import imagehash  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.sparse import coo_matrix  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402

from sparkml.config import Sample  # noqa: E402
from sparkml.phash import phash, thumb32  # noqa: E402
from sparkml.sample import generate  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=10000)
    ap.add_argument("--size", type=int, default=320, help="side of the generated images")
    ap.add_argument("--max-hamming", type=int, default=6)
    args = ap.parse_args()
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
    phash(np.stack([thumb32(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)) for a in pix]))
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
