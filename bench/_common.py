"""Shared bits of the benchmarks: the machine line, real photos, timing, the run header.

Benchmarks measure; they do not assert. Each prints our figure, the baseline's figure from
the same run on the same inputs, and the ratio. Run from the repository root:

    .venv/bin/python bench/prepare.py
"""

from __future__ import annotations

import datetime
import os
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REALSAMPLE = ROOT.parent / "shared" / "data" / "realsample"
CACHE = ROOT / ".cache" / "bench"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def header(title: str) -> None:
    print(f"# {title}\n# {machine()}\n")


def real_photos() -> list[np.ndarray]:
    """RGB arrays of real photographs: ../shared/data/realsample (faces, non-faces, tweets)
    and the photographs scikit-image ships (astronaut, coffee, chelsea, rocket, motorcycle...)."""
    from PIL import Image
    from skimage import data

    out = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(REALSAMPLE.glob("*/*.jpg"))]
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry"):
        try:
            out.append(np.asarray(getattr(data, name)())[..., :3])
        except Exception:  # some need pooch downloads; skip what is not shipped
            pass
    return out


def rate(fn, items, repeat: int = 1) -> float:
    """Items per second of fn over items (best of `repeat` passes)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def single_core() -> None:
    """Pin this process to one core and one thread per library: figures are per core."""
    import cv2

    cv2.setNumThreads(1)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


OUTPUTS = {"ingest": "tables/posts", "prepare_images": "tables/images", "dedup": "tables/duplicates"}


def _env() -> dict:
    return dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_CONF_DIR=str(ROOT / "conf" / "spark"))


def run_python(code: str, tag: str, pin_one_core: bool = False, env: dict[str, str] | None = None) -> list[float]:
    """Run `code` in a fresh Python process (its own JVM / memory peak; `env` added to its
    environment); return the numbers it prints after `tag` on one line."""
    cmd = (["taskset", "-c", "0"] if pin_one_core else []) + [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **(env or {})}, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith(tag + " ")]
    if not line:
        raise SystemExit(out.stderr[-2000:])
    return [float(x) for x in line[0].split()[1:]]


def run_job(stage: str, lake: Path, master: str, manifest: Path, *sets: str) -> dict:
    """Run jobs/<stage>.py in its own process (its own JVM) on a manifest; return its summary."""
    env = _env()
    cmd = [sys.executable, str(ROOT / "jobs" / f"{stage}.py"), "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"lake={lake}", "--set", f"spark.master={master}", "--set", f"source.path={manifest}",
           "--set", "source.layout=manifest"] + [x for s in sets for x in ("--set", s)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((Path(lake) / OUTPUTS[stage] / "_SUMMARY.json").read_text())
