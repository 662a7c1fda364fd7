"""Feature extraction under glibc's malloc settings, measured in one run: MobileNetV2 prelogit
features (random init) of 256 of ../shared/data/photos, mirrored (the demo's extract_features
settings: 128 images per forward pass), through sparkml.extract_features.extract on one core, each
setting in a fresh process (glibc reads GLIBC_TUNABLES when a process starts). The baseline is
glibc's defaults; the others keep freed memory in the heap: blocks under 32 MiB (mmap_threshold),
or all (mmap_max=0), with up to 256 MiB free at the heap's top kept. Prints images/s, user and
system CPU, the peak resident memory, and each setting's ratio to the defaults.

A Spark job's Python workers take a setting from the executors' environment
(spark.executorEnv.GLIBC_TUNABLES=...; on YARN that reaches the executor JVM too).

    .venv/bin/python bench/malloc.py [--repeat 2]
"""

from __future__ import annotations

import argparse

from _common import header, run_python

CHILD = """
import resource, sys, time
sys.path.insert(0, "bench")
from _common import single_core
single_core()
from features import dataset_jpegs
from sparkml.extract_features import decode, extract
jpegs = dataset_jpegs(None, 256)
extract([decode(jpegs[0])] * 64, "mobilenet_v2", "none", ("prelogit",), True)  # build, warm up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(0, 256, 64):
    extract([decode(b) for b in jpegs[i:i + 64]], "mobilenet_v2", "none", ("prelogit",), True)
seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print("RESULT", 256 / seconds, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_maxrss >> 10)
"""


SETTINGS = {
    "defaults": "",
    "heap < 32 MiB": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456",
    "heap, all": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=268435456",
}


def measure(tunables: str) -> dict:
    rate, user, system, maxrss_mib = run_python(CHILD, "RESULT", env={"GLIBC_TUNABLES": tunables})
    return {"rate": rate, "user": user, "sys": system, "maxrss_mib": int(maxrss_mib)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    header("Feature extraction under glibc malloc settings: MobileNetV2 prelogit + mirrored, one core")
    for name, tunables in SETTINGS.items():
        print(f"{name:14s} GLIBC_TUNABLES={tunables!r}")
    for run in range(1, a.repeat + 1):
        got = {name: measure(tunables) for name, tunables in SETTINGS.items()}
        for name, r in got.items():
            print(f"run {run} {name:14s}: {r['rate']:5.1f} images/s ({r['rate'] / got['defaults']['rate']:.2f}x)  "
                  f"user {r['user']:5.1f} s, sys {r['sys']:5.1f} s, peak RSS {r['maxrss_mib']} MiB")


if __name__ == "__main__":
    main()
