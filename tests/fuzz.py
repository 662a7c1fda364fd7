"""A seeded mutation fuzzer for the per-image path (sparkml.images.resize.prepare_image).

Seeds are real photographs (../shared/data/photos) re-encoded small as JPEG (baseline and
progressive, with and without EXIF), PNG, GIF and WebP. Each case mutates one seed: bit flips,
byte overwrites with boundary values, truncation, a marker segment or chunk removed or
duplicated, a header field (JPEG SOF size / components / precision, PNG IHDR, GIF screen
size, WebP VP8 size) set to a boundary value, random bytes inserted. Every case must end as a
Prepared image or a Rejected value with a reason, never raise, and stay within a time bound.

    python -m tests.fuzz --cases 100000 --workers 2      # what `make fuzz` runs
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import struct
import sys
import time
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
BOUNDARY = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
MAX_SECONDS = 5.0  # per case; a 640 px decode takes milliseconds


def seeds(n_photos: int = 6) -> list[tuple[str, bytes]]:
    """(format, bytes) of small real images in every format the product reads."""
    from PIL import Image

    out = []
    for p in sorted(PHOTOS.glob("*.jpg"))[:: max(1, 396 // n_photos)][:n_photos]:
        im = Image.open(p).convert("RGB")
        im.thumbnail((160, 160))
        for fmt, kw in (("JPEG", {"quality": 80}), ("JPEG", {"quality": 70, "progressive": True}),
                        ("PNG", {}), ("GIF", {}), ("WEBP", {"quality": 70})):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            out.append((fmt.lower(), buf.getvalue()))
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated: the Exif path of the header reader
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=75, exif=exif.tobytes())
        out.append(("jpeg", buf.getvalue()))
        buf = io.BytesIO()
        im.convert("L").save(buf, "JPEG", quality=75)
        out.append(("jpeg", buf.getvalue()))
    return out


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the marker segments before the scan data."""
    segs, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        end = i + 2 + ((data[i + 2] << 8) | data[i + 3])
        segs.append((marker, i, end))
        if marker == 0xDA:
            break
        i = end
    return segs


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    chunks, i = [], 8
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        chunks.append((data[i + 4:i + 8], i, i + 12 + n))
        i += 12 + n
    return chunks


def mutate(fmt: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(mutation name, mutated bytes)."""
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "overwrite", "truncate", "insert", "segment", "segment", "field", "field"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice(BOUNDARY)
    elif kind == "truncate":
        b = b[:rng.randrange(1, len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "segment":
        if fmt == "jpeg" and (segs := _jpeg_segments(data)):
            _, s, e = rng.choice(segs)
            b = b[:s] + b[e:] if rng.random() < 0.7 else b[:e] + b[s:e] + b[e:]  # remove or duplicate
        elif fmt == "png" and (chunks := _png_chunks(data)):
            _, s, e = rng.choice(chunks)
            b = b[:s] + b[e:] if rng.random() < 0.7 else b[:e] + b[s:e] + b[e:]
        else:
            i, j = sorted(rng.sample(range(len(b)), 2))
            del b[i:j]
    else:  # a header field set to a boundary value
        value = rng.choice([0, 1, 0x7FFF, 0xFFFF, rng.randrange(1 << 16)])
        if fmt == "jpeg":
            sofs = [(s, e) for m, s, e in _jpeg_segments(data) if m in (0xC0, 0xC1, 0xC2)]
            if sofs:
                s, _ = sofs[0]
                field = rng.choice(["precision", "height", "width", "components", "sampling"])
                at = {"precision": s + 4, "height": s + 5, "width": s + 7, "components": s + 9, "sampling": s + 11}[field]
                if field in ("height", "width"):
                    b[at:at + 2] = struct.pack(">H", value)
                else:
                    b[at] = value & 0xFF
                kind = f"field:sof.{field}"
        elif fmt == "png":
            field = rng.choice(["width", "height", "depth", "colour"])
            at = {"width": 16, "height": 20, "depth": 24, "colour": 25}[field]
            if field in ("width", "height"):
                b[at:at + 4] = struct.pack(">I", rng.choice([0, 1, 1 << 31, 0xFFFFFFFF, value]))
            else:
                b[at] = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255])
            kind = f"field:ihdr.{field}"
        elif fmt == "gif":
            at = rng.choice([6, 8])
            b[at:at + 2] = struct.pack("<H", value)
            kind = "field:screen"
        elif fmt == "webp":
            at = rng.choice([26, 28])  # VP8 (lossy) frame width / height
            if len(b) > at + 2:
                b[at:at + 2] = struct.pack("<H", value)
            kind = "field:vp8"
    return kind, bytes(b)


def run_case(fmt: str, data: bytes) -> tuple[str, float]:
    """The outcome ('ok' or the reject reason) and the seconds it took; raises what prepare raises."""
    from sparkml.images.resize import Rejected, prepare_image

    t0 = time.perf_counter()
    out = prepare_image(data, size=64, max_pixels=50_000_000)
    secs = time.perf_counter() - t0
    return (out.reason.value if isinstance(out, Rejected) else "ok"), secs


def fuzz(cases: int, seed: int = 0, start: int = 0) -> dict:
    """Run cases [start, start + cases) of the seeded sequence; a case's mutation depends only on
    (seed, its index), so any case can be replayed alone."""
    pool = seeds()
    outcomes: collections.Counter = collections.Counter()
    failures, slowest = [], 0.0
    for k in range(start, start + cases):
        rng = random.Random(f"{seed}:{k}")
        fmt, data = pool[rng.randrange(len(pool))]
        kind, mutated = mutate(fmt, data, rng)
        try:
            outcome, secs = run_case(fmt, mutated)
        except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
            failures.append({"case": k, "format": fmt, "mutation": kind, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        outcomes[outcome] += 1
        slowest = max(slowest, secs)
        if secs > MAX_SECONDS:
            failures.append({"case": k, "format": fmt, "mutation": kind, "error": f"took {secs:.1f} s"})
    return {"cases": cases, "outcomes": dict(outcomes), "failures": failures, "slowest_s": round(slowest, 3)}


def _worker(args) -> dict:
    return fuzz(*args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    import multiprocessing as mp

    t0 = time.perf_counter()
    chunk = -(-a.cases // (a.workers * 20))
    jobs = [(min(chunk, a.cases - s), a.seed, s) for s in range(0, a.cases, chunk)]
    total: collections.Counter = collections.Counter()
    failures, slowest = [], 0.0
    with mp.get_context("spawn").Pool(a.workers) as pool:
        for r in pool.imap_unordered(_worker, jobs):
            total.update(r["outcomes"])
            failures += r["failures"]
            slowest = max(slowest, r["slowest_s"])
    n = sum(total.values()) + len(failures)
    print(f"fuzz: {n} cases (seed {a.seed}) in {time.perf_counter() - t0:.0f} s, {len(failures)} failures, "
          f"slowest case {slowest:.2f} s; outcomes {dict(sorted(total.items()))}")
    for f in failures[:20]:
        print("  ", f)
    return 1 if failures or n != a.cases else 0


if __name__ == "__main__":
    sys.exit(main())
