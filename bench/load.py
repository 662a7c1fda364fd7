"""Load run of the data side (issue 18): ingest -> prepare_images -> dedup -> build_dataset on
generated samples of N posts (jobs/make_sample.py: 640 px JPEGs, InstaCities captions, the
planted mess scaled with N), each stage under spark-submit as a user runs it (local[*,4],
6 GB driver), with the wall time per stage, posts per second, and the peak resident memory of
the driver and of the executors, sampled every 0.2 s from the process tree:

- driver JVM: the spark-submit JVM's RSS; in local mode it is also the executor, and its RSS
  tends towards -Xmx (6 GB) whatever the input, so the heap left live after the stage's
  largest garbage collection is reported too (from -Xlog:gc);
- driver Python: the job's own process (jobs/<stage>.py), where a driver-side collect of the
  input would show as growth with N;
- executor Python: the Python workers (pyspark.daemon and its forks), peak of their sum and
  the largest single worker.

The baseline is the same run at the smallest N: the table prints seconds per 1,000 posts and
the memory at the largest N against the smallest (1.0x = flat, 10x = linear in the input).
Not part of CI. Samples are kept under .cache/load and reused.

    .venv/bin/python bench/load.py --posts 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from _common import ROOT, header

STAGES = ("ingest", "prepare_images", "dedup", "build_dataset")
OUT = {"ingest": "tables/posts", "prepare_images": "tables/images", "dedup": "tables/duplicates",
       "build_dataset": "datasets/cities/_SUMMARY.json"}
WORK = ROOT / ".cache" / "load"
BIN = Path(sys.executable).parent


def sample(n: int) -> Path:
    out = WORK / f"posts{n}"
    truth = out / "ground_truth.json"
    if truth.exists() and json.loads(truth.read_text())["posts"] == n:
        return out
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "jobs/make_sample.py", "--config", "conf/local.yaml",
                    "--set", f"sample.posts={n}", "--set", "sample.me_posts=0", "--set", f"sample.out={out}",
                    "--set", f"sample.workers={os.cpu_count()}"], cwd=ROOT, check=True)
    print(f"# generated {n} posts in {time.perf_counter() - t0:.0f}s -> {out}", flush=True)
    return out


class Peaks:
    """Peak RSS (bytes) by role over the process tree of `root`, sampled every `every` s."""

    def __init__(self, root: psutil.Process, every: float = 0.2):
        self.root, self.every = root, every
        self.peak = {"driver_jvm": 0, "driver_python": 0, "executor_python_sum": 0, "executor_python_max": 0,
                     "executor_jvm_sum": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            workers = executors = 0
            for p in procs:
                try:  # a process may end between the listing and these reads
                    rss, cmd, name = p.memory_info().rss, " ".join(p.cmdline()), p.name()
                except psutil.Error:
                    continue
                if "java" in name and "CoarseGrainedExecutorBackend" in cmd:  # local-cluster executors
                    executors += rss
                elif "java" in name:
                    self._up("driver_jvm", rss)
                elif "pyspark.daemon" in cmd or "pyspark/daemon" in cmd or "pyspark.worker" in cmd:
                    workers += rss
                    self._up("executor_python_max", rss)
                elif "jobs/" in cmd and "python" in name:
                    self._up("driver_python", rss)
            self._up("executor_python_sum", workers)
            self._up("executor_jvm_sum", executors)
            self._stop.wait(self.every)

    def _up(self, key: str, v: int) -> None:
        self.peak[key] = max(self.peak[key], v)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return self.peak


def submit(job: list[str], log: Path, master: str, driver_memory: str = "6g") -> dict:
    """spark-submit <job> from the repository with the venv's Python, its output to `log`, the
    driver's GC to log.gc: wall seconds, memory peaks by role and the live heap. Exits on failure."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_CONF_DIR=str(ROOT / "conf" / "spark"))
    cmd = ["spark-submit", "--driver-memory", driver_memory, "--master", master,
           "--conf", "spark.driver.extraJavaOptions=-Xlog:gc:file=" + str(log.with_suffix(".gc")), *job]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = psutil.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        peaks = Peaks(proc)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    peak = peaks.stop()
    if rc:
        raise SystemExit(f"{job[0]} failed ({rc}), see {log}")
    return {"seconds": wall, **peak, "heap_after_gc": heap_from_gc_log(log.with_suffix(".gc"))}


def run_stage(stage: str, lake: Path, src: Path, log: Path, master: str = "local[*,4]") -> dict:
    run = submit([f"jobs/{stage}.py", "--config", "conf/local.yaml", "--set", f"lake={lake}",
                  "--set", f"source.path={src / 'manifest.jsonl'}", "--set", "source.layout=manifest"], log, master)
    summary = lake / OUT[stage]
    summary = summary if summary.suffix == ".json" else summary / "_SUMMARY.json"
    return {"stage": stage, **run, "summary": json.loads(summary.read_text())}


def heap_from_gc_log(path: Path) -> int:
    """The JVM heap in use after its largest collection (bytes), from -Xlog:gc's
    'Pause ... 1234M->567M(6144M)' lines: the heap the stage actually kept live, at its peak."""
    best = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        if "->" in line and "Pause" in line:
            after = line.rsplit("->", 1)[1].split("(", 1)[0]
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(after[-1:], 1)
            try:
                best = max(best, int(float(after.rstrip("KMG")) * unit))
            except ValueError:
                continue
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--keep", action="store_true", help="keep the lakes under .cache/load")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), help="run these (on a kept lake: the rest ran before)")
    ap.add_argument("--master", default="local[*,4]", help="e.g. local-cluster[2,1,3072]: executors in JVMs of their "
                                                         "own, so the driver's heap is measured apart from theirs")
    args = ap.parse_args()
    header("Load run: ingest -> prepare_images -> dedup -> build_dataset")
    results: dict[int, list[dict]] = {}
    for n in args.posts:
        src = sample(n)
        lake = WORK / f"lake{n}"
        if args.stages[0] == STAGES[0]:
            shutil.rmtree(lake, ignore_errors=True)
        results[n] = []
        for stage in args.stages:
            r = run_stage(stage, lake, src, WORK / f"{stage}{n}.log", args.master)
            results[n].append(r)
            s = r["summary"]
            print(f"{n:>7} posts {stage:<15} {r['seconds']:7.1f}s  in={s.get('input_rows')} out={s.get('output_rows')}  "
                  f"jvm {r['driver_jvm'] / 2**30:.2f} GiB (heap live {r['heap_after_gc'] / 2**30:.2f})  "
                  f"driver py {r['driver_python'] / 2**20:.0f} MiB  workers {r['executor_python_sum'] / 2**20:.0f} MiB "
                  f"(max {r['executor_python_max'] / 2**20:.0f})  executor JVMs {r['executor_jvm_sum'] / 2**30:.2f} GiB",
                  flush=True)
        if not args.keep:
            shutil.rmtree(lake, ignore_errors=True)
    (WORK / f"results-{args.master.split('[')[0]}.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))

    lo, hi = min(results), max(results)
    print(f"\n| stage | s per 1k posts at {lo:,} | at {hi:,} | time ratio per post | driver JVM live heap {lo:,} -> {hi:,} "
          f"| driver Python {lo:,} -> {hi:,} | executor Python (sum) {lo:,} -> {hi:,} |")
    print("|---|---|---|---|---|---|---|")
    gib, mib = 2**30, 2**20
    for a, b in zip(results[lo], results[hi]):
        pa, pb = a["seconds"] * 1000 / lo, b["seconds"] * 1000 / hi
        print(f"| {a['stage']} | {pa:.2f} | {pb:.2f} | {pb / pa:.2f}x | {a['heap_after_gc'] / gib:.2f} -> "
              f"{b['heap_after_gc'] / gib:.2f} GiB | {a['driver_python'] / mib:.0f} -> {b['driver_python'] / mib:.0f} MiB "
              f"| {a['executor_python_sum'] / mib:.0f} -> {b['executor_python_sum'] / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
