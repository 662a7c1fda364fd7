"""The training function: one definition that runs alone in one process, under torchrun, and
under TorchDistributor (local or barrier mode). Torch, petastorm and pyarrow only, no Spark:
the driver (sparkml.cnn.train_cnn) hands it one TrainSpec (dl.spec) and gets rank 0's small result back.

    result = run(spec)      # spec: dl.spec.TrainSpec

Per epoch every rank runs the same number of batches (dl.data.plan) of its own shard; the
gradients are averaged by the backend (dl.distributed). Dropout is reseeded from (seed, rank,
epoch, batch) before every forward pass and the crops come from (seed, epoch, post_id), so the
random state at any point is a function of the position: a checkpoint holds the model,
optimizer and scheduler state and the position (epoch, batch, iteration, running sums), and a
resumed run takes the same steps as an uninterrupted one. Rank 0 writes checkpoints, the best
model by validation (<lake>/models/<task>/model.pt + model.json), metrics.json, TensorBoard
events and the training curve (<lake>/reports/train_<task>/), through dl.results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from dl import checkpoint, data, distributed
from dl.recipe import (TASKS, TrainError, batchnorm_frozen, build, classification, finite, loss_fn, masked_bce,
                       optimizer, schedule, set_train_mode)
from dl.results import Results
from dl.spec import TrainSpec

# The per-rank sums of the epoch so far (train loss and accuracy), checkpointed for every rank.
RUNNING = ("loss_sum", "correct", "rows")


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


class Run:
    """One rank's training run over a TrainSpec."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.t = spec.train
        self.task = TASKS[self.t.task]
        self.io = spec.io
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // self.t.processes))
        self.b = distributed.backend(self.t.backend, spec.gpu)
        self.rank0 = self.b.rank == 0
        self.device = self.b.device
        self.bf16 = self.t.precision == "bf16" or (self.t.precision == "auto" and self.device.type == "cuda")
        self.model, self.frozen = build(self.t, spec.outputs, **self.io)
        pre = spec.preprocessing
        # a row as a training example: the task's target, train.crop, the weights' input normalisation
        self.examples = data.Examples(target=self.task.target, crop=self.t.crop, seed=self.t.seed, width=spec.outputs,
                                      norm=(tuple(pre["mean"]), tuple(pre["std"])))
        # the inputs are channels_last either way
        fmt = torch.channels_last if self.t.channels_last and self.b.channels_last_params else torch.contiguous_format
        self.model.to(self.device, memory_format=fmt)
        p = data.plan(spec.urls["train"], self.b.size, self.t.batch_size, **self.io)
        self.batches = p.steps - p.steps % self.t.accumulate  # per epoch, a whole number of iterations
        if self.batches == 0:
            raise TrainError(f"{p.steps} batches per rank per epoch, fewer than train.accumulate={self.t.accumulate}")
        self.iterations = self.t.epochs * self.batches // self.t.accumulate
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.opt = self.b.wrap_optimizer(optimizer(self.t, params, self.b.size), self.model, self.t.accumulate)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule(self.t, self.iterations))
        self.pos = {"epoch": 0, "batch": 0, "iteration": 0, "loss_sum": 0.0, "correct": 0, "rows": 0,
                    "history": [], "best": None}
        self.resumed_from = None
        uri, state, damaged = checkpoint.load_latest(spec.checkpoints, **self.io) if spec.resume \
            else (None, None, [])
        for why in damaged if self.rank0 else ():
            self.say(f"train_cnn: --resume: skipped a damaged checkpoint ({why})")
        if damaged and uri is None:
            raise TrainError(f"--resume: no checkpoint under {spec.checkpoints} loads ({damaged[0]}): run "
                             "without --resume to start over")
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.pos = state["position"]
            self.pos.update(self.pos.pop("ranks")[self.b.rank])  # this rank's running sums
            self.resumed_from = uri
        self.net = self.b.wrap(self.model)
        self.results = Results(spec)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        t, pos = self.t, self.pos
        if self.rank0:
            world = f"{self.b.size} process{'es' if self.b.size > 1 else ''} on {self.device.type}"
            self.say(f"train_cnn {t.task}: {t.model} (weights {t.weights}), {world}, {self.batches} batches of "
                     f"{t.batch_size} per process per epoch, {t.epochs} epochs, {self.iterations} iterations"
                     + (f"; resumed from {self.resumed_from} at epoch {pos['epoch'] + 1} batch {pos['batch']}"
                        if self.resumed_from else ""))
        while pos["epoch"] < t.epochs:
            self.epoch(pos["epoch"])
        best = self.best_model()
        test = self.evaluate("test", best)
        result = {"history": pos["history"], "best": pos["best"], "test": test, "batches_per_epoch": self.batches,
                  "iterations": self.iterations, "world": self.b.size, "device": self.device.type,
                  "resumed_from": self.resumed_from}
        if self.rank0:
            self.results.write_json("metrics.json", result)
            self.results.close()
        self.b.close()  # a barrier first: no rank returns before rank 0 has written the metrics
        return result

    def epoch(self, e: int) -> None:
        t, pos, task = self.t, self.pos, self.task
        set_train_mode(self.model, self.frozen)
        stats: dict = {}
        t0 = time.perf_counter()
        t_log, wait, n_log = t0, 0.0, 0
        start = pos["batch"]
        loader = data.batches(self.spec.urls["train"], self.b.rank, self.b.size, e, t.batch_size, self.batches,
                              self.examples, skip=start, prefetch=t.prefetch, stats=stats, **self.io)
        it = iter(loader)
        for i in range(start, self.batches):
            w0 = time.perf_counter()
            x, y = next(it)
            wait += time.perf_counter() - w0
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            torch.manual_seed(_seed(t.seed, self.b.rank, e, i))  # dropout: a function of the position
            last = (i + 1) % t.accumulate == 0
            with (self.b.no_sync(self.net) if not last else contextlib.nullcontext()):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    logits = self.net(x)
                loss = loss_fn(task, logits, y)
                (loss / t.accumulate).backward()
            pos["loss_sum"] += float(loss.detach())
            pos["rows"] += len(y)
            if task.loss == "ce":
                pos["correct"] += int((logits.detach().argmax(1) == y).sum())
            pos["batch"] = i + 1
            if last:
                with self.b.averaged(self.opt):  # every rank sees the same gradients and stops together
                    if not finite([q.grad for q in self.model.parameters() if q.grad is not None]):
                        raise TrainError(f"epoch {e + 1} batch {i + 1}: the loss ({float(loss.detach()):.4g}) or its "
                                         f"gradients are NaN or infinite: training diverged; lower train.lr (now {t.lr})")
                    self.opt.step()
                self.opt.zero_grad()  # None grads (the default since torch 2.0; Horovod takes no argument)
                self.sched.step()
                pos["iteration"] += 1
                n_log += 1
                if self.rank0 and n_log % t.log_every == 0:
                    self.progress(e, i + 1, t_log, wait, n_log, pos)
                    t_log, wait, n_log = time.perf_counter(), 0.0, 0
                if t.checkpoint_every and pos["iteration"] % t.checkpoint_every == 0 and i + 1 < self.batches:
                    self.save()
        loader.close()
        if not finite(list(self.model.parameters())):
            raise TrainError(f"epoch {e + 1}: the weights hold NaN or infinite values: training diverged; lower "
                             f"train.lr (now {t.lr}); nothing was exported from this epoch")
        seconds = time.perf_counter() - t0
        n = max(1, pos["rows"])
        train_loss = float(self.b.mean(torch.tensor(pos["loss_sum"] / max(1, pos["batch"]), dtype=torch.float64)))
        record = {"epoch": e + 1, "train_loss": train_loss, "seconds": round(seconds, 2),
                  "samples_per_s": round((self.batches - start) * t.batch_size * self.b.size / max(seconds, 1e-9), 2),
                  "loader_samples_per_s": round(stats["rows"] / max(stats["busy_s"], 1e-9) * self.b.size, 2),
                  "lr": self.opt.param_groups[0]["lr"]}
        if task.loss == "ce":
            record["train_accuracy"] = float(self.b.mean(torch.tensor(pos["correct"] / n, dtype=torch.float64)))
        val = self.evaluate("val", None)
        record.update({f"val_{k}": v for k, v in val.items() if k in ("loss", "top1", "accuracy", "ap")})
        pos["history"].append(record)
        pos.update(epoch=e + 1, batch=0, loss_sum=0.0, correct=0, rows=0)
        figure = val.get(task.select)
        best = pos["best"]
        better = figure is not None and (best is None or (figure > best["value"] if task.higher_is_better
                                                          else figure < best["value"]))
        if better:
            pos["best"] = {"epoch": e + 1, "metric": f"val_{task.select}", "value": figure}
            if self.rank0:
                self.results.export(self.model, self.meta(e + 1, val))
        if self.rank0:
            self.say(f"epoch {e + 1}/{t.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "lr")
                + (" (best so far: exported)" if better else ""))
            self.results.log_epoch(record, pos["history"], pos["best"], t.task)
        self.save()

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, split: str, weights: dict | None) -> dict:
        """Loss and the task's figures on a split (every rank its shard, gathered); for the
        topics task on the test split, each rank also writes its images' regressed vectors."""
        t, task = self.t, self.task
        model = self.model
        if weights is not None:
            model.load_state_dict(weights)
        model.eval()
        scores, targets, ids, loss_sum, count = [], [], [], 0.0, 0
        url = self.spec.urls[split]
        # a split with fewer row groups than ranks (val and test are small) is read by as many ranks
        shards = min(self.b.size, len(data.row_group_rows(url, **self.io)))
        loader = data.batches(url, self.b.rank, shards, 0, t.batch_size, None, replace(self.examples, train=False),
                              prefetch=t.prefetch, ids=True, **self.io) if self.b.rank < shards else iter(())
        with torch.inference_mode():
            for x, y, names in loader:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    logits = model(x.to(self.device)).float()
                y = y.to(self.device)
                if task.loss == "ce":
                    loss_sum += float(F.cross_entropy(logits, y.long(), reduction="sum"))
                    count += len(y)
                else:
                    loss, rows = masked_bce(logits, y, "sum")
                    loss_sum += float(loss)
                    count += rows
                scores.append(logits.cpu().numpy())
                targets.append(y.cpu().numpy())
                ids += names
        width = self.spec.outputs
        scores_np = np.concatenate(scores) if scores else np.zeros((0, width), np.float32)
        targets_np = np.concatenate(targets) if targets else np.zeros((0,) if task.loss == "ce" else (0, width))
        if task.loss == "bce" and split == "test" and self.spec.staged.table:
            self.results.write_vectors(ids, torch.sigmoid(torch.from_numpy(scores_np)).numpy(), split, self.b.rank)
        parts = self.b.gather((loss_sum, count, scores_np if task.loss == "ce" else None,
                               targets_np if task.loss == "ce" else None))
        total = sum(c for _, c, _, _ in parts)
        out = {"loss": sum(s for s, _, _, _ in parts) / total if total else None, "rows": total}
        if task.loss == "ce":
            out.update(classification(np.concatenate([s for _, _, s, _ in parts]),
                                      np.concatenate([y for _, _, _, y in parts]), self.spec.labels))
        return out

    # ---- checkpoints and the exported model's description ------------------------------------
    def save(self) -> None:
        """A checkpoint of the position (every rank's own running sums in it), written by rank 0."""
        sums = self.b.gather({k: self.pos[k] for k in RUNNING})
        if self.rank0:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "position": {**self.pos, "ranks": sums},
                     "train": self.spec.train.model_dump()}
            checkpoint.save(state, self.spec.checkpoints, self.pos["iteration"], **self.io)
            checkpoint.prune(self.spec.checkpoints, self.t.keep_checkpoints, **self.io)
        self.b.barrier()  # no rank runs ahead of a checkpoint the others may resume from

    def best_model(self) -> dict | None:
        """The exported best weights (every rank reads them), None when no epoch had a figure."""
        if self.pos["best"] is None:
            return None
        state = checkpoint.load(f"{self.spec.staged.export.rstrip('/')}/model.pt", **self.io)
        return state["model"]

    def card(self) -> dict:
        """The exported model's weights card (dl.weights): the normalisation and builder arguments
        of the weights it started from, its own classes, batch norm still folded if it was kept frozen."""
        from dl.weights import Card

        start = Card.model_validate(self.spec.card)
        folded = start.batchnorm == "folded" and batchnorm_frozen(self.t, start)
        return start.model_copy(update={
            "crop": self.t.crop, "categories": self.spec.labels, "batchnorm": "folded" if folded else "trained",
            "sha256": None, "source": f"train_cnn --task {self.t.task} from {self.t.weights}"}).model_dump()

    def meta(self, epoch: int, val: dict) -> dict:
        t = self.t
        return {"task": t.task, "model": t.model, "outputs": self.spec.outputs, "labels": self.spec.labels,
                "target": self.task.target, "output": "softmax" if self.task.loss == "ce" else "sigmoid",
                "preprocessing": self.spec.preprocessing, "card": self.card(), "epoch": epoch,
                "validation": {k: v for k, v in val.items() if k != "confusion"},
                "trained_from": t.weights, "dataset": self.spec.dataset, "train": self.spec.train.model_dump()}

    def say(self, line: str) -> None:
        print(line, flush=True)

    def progress(self, e: int, batch: int, since: float, wait: float, iterations: int, pos: dict) -> None:
        t = self.t
        seconds = time.perf_counter() - since
        rate = iterations * t.accumulate * t.batch_size * self.b.size / max(seconds, 1e-9)
        left = (t.epochs - e - 1) * self.batches + self.batches - batch
        eta = left * t.batch_size * self.b.size / max(rate, 1e-9)
        self.say(f"epoch {e + 1}/{t.epochs} batch {batch}/{self.batches} loss "
                 f"{pos['loss_sum'] / max(1, pos['batch'] - 0):.4f} {rate:.1f} samples/s "
                 f"(waiting for data {100 * wait / max(seconds, 1e-9):.0f}%) ETA {_duration(eta)}")



def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run(spec: TrainSpec) -> dict:
    """The entry point TorchDistributor, torchrun and the inline mode call in every process."""
    return Run(spec).fit()


if __name__ == "__main__":  # torchrun -m dl.train spec.json: a node without Spark (a spec the driver wrote)
    with open(sys.argv[1]) as f:
        figures = run(TrainSpec.from_json(f.read()))["test"]
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(figures, default=str), flush=True)
