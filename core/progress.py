"""Progress lines for long stages: every `progress.interval` seconds the driver logs what the
running Spark job has done, so a stage over a million images is not silent for an hour.

    score: 12,345/1,000,000 rows (1.2%), 850 rows/s, ETA 19m22s [stage 7: 31/800 tasks]

Rows come from an accumulator the per-record adapters add each Arrow batch to (`counter`):
Spark sends accumulator updates with finished tasks, so the count moves task by task. Stages
without one report their active Spark stages' tasks (Spark's status tracker). Off under CI
(the CI environment variable) and with progress.interval=0.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("instalearn")

_current: "Progress | None" = None


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The reporting thread of one stage (a context manager)."""

    def __init__(self, spark, stage: str, interval: float):
        self.spark, self.stage, self.interval = spark, stage, interval
        self.acc, self.total, self.since = None, None, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"progress-{stage}")

    def __enter__(self) -> "Progress":
        global _current
        _current = self
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = None
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def track(self, acc, total: int | None) -> None:
        self.acc, self.total, self.since = acc, total, time.perf_counter()

    def line(self) -> str | None:
        tracker = self.spark.sparkContext.statusTracker()
        stages = [s for s in (tracker.getStageInfo(i) for i in tracker.getActiveStageIds()) if s is not None]
        tasks = ", ".join(f"stage {s.stageId}: {s.numCompletedTasks}/{s.numTasks} tasks" for s in stages)
        if self.acc is None:  # iterative work (SVM grids, LDA): how many Spark jobs have finished
            jobs = tracker.getJobIdsForGroup(None)
            done = len(jobs) - len(tracker.getActiveJobsIds())
            tasks = f"{done} Spark jobs done in {duration(time.perf_counter() - self.since)}" + (
                f", running {tasks}" if tasks else "")
        if self.acc is not None:
            done, elapsed = self.acc.value, time.perf_counter() - self.since
            rate = done / elapsed if elapsed > 0 else 0.0
            head = f"{done:,}" + (f"/{self.total:,} rows ({100 * done / max(self.total, 1):.1f}%)" if self.total
                                  else " rows")
            eta = f", ETA {duration((self.total - done) / rate)}" if self.total and rate > 0 else ""
            return f"{self.stage}: {head}, {rate:,.1f} rows/s{eta}" + (f" [{tasks}]" if tasks else "")
        return f"{self.stage}: {tasks}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                text = self.line()
            except Exception as e:  # noqa: BLE001 - a progress line must never fail the stage
                text = f"{self.stage}: (no progress: {type(e).__name__})"
            if text:
                log.info(text)


def interval(configured: float) -> float:
    """The configured interval, 0 under CI (quiet logs there)."""
    return 0.0 if os.environ.get("CI", "").lower() in ("1", "true", "yes") else configured


def counter(spark, total: int | None = None):
    """An accumulator a per-record adapter adds its batch sizes to; the running stage's
    progress line reports it (rows done of `total`)."""
    acc = spark.sparkContext.accumulator(0)
    if _current is not None:
        _current.track(acc, total)
    return acc


def counted(batches, fn, acc):
    """fn over Arrow batches, each batch's rows added to acc (on the executor)."""
    for b in batches:
        out = fn(b)
        acc.add(b.num_rows)
        yield out
