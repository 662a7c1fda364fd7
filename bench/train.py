"""Training throughput benchmark (issue 15): samples/s of jobs/train_cnn.py per task for one
process (all cores) and two processes (one core each) on local Spark, beside two baselines
measured in the same run on the same machine:

- the step limit: the same model, frozen layers, optimizer and batch, stepping on one batch
  already in memory (no data at all), one process with all cores. Ours / limit is the
  fraction of the compute the training job turns into samples.
- the loader alone: dl.data.batches over the training split (Petastorm read, JPEG decode,
  random crop + mirror, normalise) in one background thread, no model: if it is well above
  the step's rate, the step never waits for data.

Datasets: the demo's (`make demo` first): datasets/cities for city and topics (its topic
column), datasets/likability for likability; one epoch per run, the *-scratch presets. The
runs write into that lake: they replace its models/<task>, reports/train_<task> and
checkpoints/train_<task> (rerun the demo's train_cnn step to get its 3-epoch model back).

    .venv/bin/python bench/train.py [--lake data/lake] [--tasks city likability topics]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import ROOT, header

import torch  # noqa: E402

from core.config import load_config  # noqa: E402
from dl import data  # noqa: E402
from dl.recipe import TASKS, build, loss_fn, optimizer  # noqa: E402
from sparkml.cnn.train_cnn import preset  # noqa: E402


def step_limit(t, outputs: int, target: str, seconds: float = 20.0) -> float:
    """Samples/s of forward + backward + optimizer step on one in-memory batch."""
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = build(t, outputs)
    model.train().to(memory_format=torch.channels_last)
    opt = optimizer(t, [p for p in model.parameters() if p.requires_grad], 1)
    x = torch.randn(t.batch_size, 3, t.crop, t.crop).contiguous(memory_format=torch.channels_last)
    y = (torch.randint(0, outputs, (t.batch_size,)) if target == "label"
         else torch.softmax(torch.randn(t.batch_size, outputs), 1))
    task = TASKS[t.task]
    n, t0 = 0, None
    while True:
        loss = loss_fn(task, model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += 1
        if n == 2:  # warm-up done
            t0 = time.perf_counter()
        elif t0 and time.perf_counter() - t0 > seconds and n > 4:
            return (n - 2) * t.batch_size / (time.perf_counter() - t0)


def loader_alone(url: str, t, target: str, width: int | None) -> float:
    stats: dict = {}
    t0 = time.perf_counter()
    rows = 0
    for x, _ in data.batches(url, 0, 1, 0, t.batch_size, None, data.Examples(target, t.crop, True, 0, width),
                             stats=stats):
        rows += len(x)
    return rows / (time.perf_counter() - t0)


def job(lake: str, task: str, processes: int, mode: str) -> dict:
    cmd = [sys.executable, str(ROOT / "jobs" / "train_cnn.py"), "--config", str(ROOT / "conf" / "local.yaml"),
           "--task", task, "--preset", f"{task}-scratch", "--set", f"lake={lake}", "--set", "train.epochs=1",
           "--set", f"train.processes={processes}", "--set", f"train.mode={mode}", "--set", "train.log_every=1000",
           "--set", "train.checkpoint_every=0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    s = json.loads(open(os.path.join(lake, "models", task, "_SUMMARY.json")).read())
    h = s["history"][0]
    return {"samples_per_s": h["samples_per_s"], "loader_samples_per_s": h["loader_samples_per_s"],
            "epoch_s": h["seconds"], "job_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default=str(ROOT / "data" / "lake"))
    p.add_argument("--tasks", nargs="+", default=["city", "likability", "topics"])
    args = p.parse_args()
    header("train_cnn throughput (samples/s), one epoch, *-scratch presets")
    rows = []
    for task in args.tasks:
        cfg = load_config(ROOT / "conf" / "local.yaml", [f"lake={args.lake}"], preset(task, f"{task}-scratch"))
        t = cfg.train
        url = f"{args.lake}/datasets/{t.dataset}/train"
        if not os.path.isdir(url):
            sys.exit(f"{url} is missing: run `make demo` first (or give --lake)")
        target = TASKS[task].target
        labels = json.load(open(f"{args.lake}/datasets/{t.dataset}/labels.json"))
        from sparkml.cnn.train_cnn import _field_width

        outputs = _field_width(url, "topics") if target == "topics" else len(labels)
        limit = step_limit(t, outputs, target)
        loader = loader_alone(url, t, target, outputs)
        one = job(args.lake, task, 1, "inline")
        two = job(args.lake, task, 2, "local")
        row = {"task": task, "model": t.model, "batch": t.batch_size, "step_limit": round(limit, 2),
               "loader_alone": round(loader, 1), "one_process": one, "two_processes": two}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| task | model | batch/process | step limit (1 process, all cores) | loader alone (1 thread) | "
          "ours, 1 process | ours, 2 processes | 2 proc / limit | loader in the job (2 proc) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['model']} | {r['batch']} | {r['step_limit']:.1f} | {r['loader_alone']:.0f} | "
              f"{r['one_process']['samples_per_s']:.1f} | {r['two_processes']['samples_per_s']:.1f} | "
              f"{r['two_processes']['samples_per_s'] / r['step_limit']:.2f} | "
              f"{r['two_processes']['loader_samples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
