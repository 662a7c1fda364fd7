"""The training function: one definition that runs alone in one process, under torchrun, and
under TorchDistributor (local or barrier mode). Torch, petastorm and pyarrow only, no Spark:
the driver (sparkml.training) hands it one TrainSpec (dl.spec) and gets rank 0's small result back.

    result = run(spec)      # spec: dl.spec.TrainSpec

Per epoch every rank runs the same number of batches (dl.data.plan) of its own shard; the
gradients are averaged by the backend (dl.distributed). Dropout is reseeded from (seed, rank,
epoch, batch) before every forward pass and the crops come from (seed, epoch, post_id), so the
random state at any point is a function of the position: a checkpoint holds the model,
optimizer and scheduler state and the position (epoch, batch, iteration, running sums), and a
resumed run takes the same steps as an uninterrupted one. Rank 0 writes checkpoints, the best
model by validation (<lake>/models/<task>/model.pt + model.json), metrics.json, TensorBoard
events and the training curve (<lake>/reports/train_<task>/).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import storage
from core.figures import png, pyplot
from dl import checkpoint, data, distributed, models
from dl.spec import TrainSpec

# What each task learns and how its validation picks the best epoch.
@dataclass(frozen=True)
class Task:
    target: str          # dataset column: label (int) or topics (float vector)
    loss: str            # ce: cross-entropy; bce: sigmoid cross-entropy on soft targets
    select: str          # validation figure that picks the exported model
    higher_is_better: bool


TASKS = {
    "city": Task("label", "ce", "top1", True),
    "likability": Task("label", "ce", "accuracy", True),
    "topics": Task("topics", "bce", "loss", False),
}

# Fields of train.* that a resumed run must share with the checkpoint it continues.
RESUME_KEYS = ("task", "dataset", "model", "weights", "seed", "freeze", "batchnorm", "dropout", "optimizer",
               "batch_size", "accumulate", "crop", "processes", "backend")


# The per-rank sums of the epoch so far (train loss and accuracy), checkpointed for every rank.
RUNNING = ("loss_sum", "correct", "rows")


class TrainError(ValueError):
    """A training setup that cannot run (bad freeze list, too few batches): said in one line."""


def frozen_modules(model: nn.Module, freeze: list[str]) -> list[str]:
    """The module names train.freeze asks for; `backbone` stands for every module outside the
    head's path (the head alone is trained)."""
    names = dict(model.named_modules())
    out = []
    for prefix in freeze:
        if prefix == "backbone":
            path, _ = models.head(model)
            node = ""
            for part in path.split("."):  # walk down to the head: every sibling on the way is backbone
                parent = model.get_submodule(node) if node else model
                out += [f"{node}.{n}" if node else n for n, _ in parent.named_children() if n != part]
                node = f"{node}.{part}" if node else part
        elif prefix not in names:
            top = ", ".join(n for n, _ in model.named_children())
            raise TrainError(f"train.freeze: {type(model).__name__.lower()} has no module {prefix!r} (its top-level "
                             f"modules: {top}; or backbone: all but the head)")
        else:
            out.append(prefix)
    return out


def batchnorm_frozen(t, card) -> bool:
    """Batch norm held in eval mode with its affine fixed: asked for, or (auto) weights whose
    batch norm was folded into the convolutions (train mode would discard the folded scale)."""
    return t.batchnorm == "frozen" or (t.batchnorm == "auto" and card.batchnorm == "folded")


def build(t, outputs: int, endpoint: str | None = None, region: str | None = None) -> tuple[nn.Module, list[str]]:
    """The model with its new head and the names of its frozen modules (their weights fixed;
    with frozen batch norm, every batch-norm layer among them)."""
    from dl.weights import card

    model = models.load_model(t.model, t.weights, num_classes=outputs, endpoint=endpoint, region=region, seed=t.seed)
    frozen = frozen_modules(model, list(t.freeze))
    if batchnorm_frozen(t, card(t.model, t.weights, endpoint, region)):
        frozen += [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in frozen:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainError(f"train.freeze {list(t.freeze)} leaves nothing of {t.model} to train")
    if t.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = t.dropout
    return model, frozen


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """Training mode, except frozen modules: their batch-norm statistics stay fixed too."""
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()


def schedule(t, iterations: int):
    """Learning-rate factor per optimizer step (LambdaLR)."""
    if t.schedule == "step":
        return lambda it: t.gamma ** (it // t.step_size)
    if t.schedule == "poly":
        return lambda it: max(0.0, 1.0 - it / max(1, iterations)) ** t.power
    return lambda it: 1.0


def optimizer(t, params, world: int) -> torch.optim.Optimizer:
    lr = t.lr * (world if t.lr_scaling == "linear" else 1)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)


def finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of the tensors is finite (one reduction, not one per tensor)."""
    return not tensors or bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def loss_fn(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of the batch; soft targets that are missing (NaN rows) do not count."""
    logits = logits.float()
    if task.loss == "ce":
        return F.cross_entropy(logits, target.long())
    ok = ~torch.isnan(target).any(1)
    if not bool(ok.any()):
        return logits.sum() * 0.0  # keeps every parameter in the graph (DDP expects it)
    return F.binary_cross_entropy_with_logits(logits[ok], target[ok])


def classification(scores: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """top1 / accuracy, per-class accuracy and the confusion matrix (rows: true, columns:
    predicted); with two classes also the average precision of class 1."""
    pred = scores.argmax(1)
    k = len(names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels.astype(int), pred), 1)
    per = {n: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None) for i, n in enumerate(names)}
    out = {"rows": int(len(labels)), "top1": float((pred == labels).mean()) if len(labels) else None,
           "per_class": per, "confusion": confusion.tolist()}
    out["accuracy"] = out["top1"]
    if k == 2 and len(set(labels.tolist())) == 2:
        from sklearn.metrics import average_precision_score

        prob = torch.softmax(torch.from_numpy(scores).double(), 1)[:, 1].numpy()
        out["ap"] = float(average_precision_score(labels, prob))
        out["positive_rate"] = float(labels.mean())
    return out


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
        self.norm = (tuple(pre["mean"]), tuple(pre["std"]))  # the weights' input normalisation
        # Horovod's collectives take contiguous tensors only: its parameters (and so their
        # gradients) stay in the default format; the inputs are channels_last either way
        fmt = torch.channels_last if self.t.channels_last and self.t.backend != "horovod" else torch.contiguous_format
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
        self.writer = None

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
            self.write_json("metrics.json", result)
            if self.writer:
                self.writer.close()
                self.upload_events()
        self.b.barrier()
        self.b.close()
        return result

    def epoch(self, e: int) -> None:
        t, pos, task = self.t, self.pos, self.task
        set_train_mode(self.model, self.frozen)
        stats: dict = {}
        t0 = time.perf_counter()
        t_log, wait, n_log = t0, 0.0, 0
        start = pos["batch"]
        loader = data.batches(self.spec.urls["train"], self.b.rank, self.b.size, e, t.batch_size, self.batches,
                              seed=t.seed, crop=t.crop, target=task.target, train=True, skip=start,
                              prefetch=t.prefetch, width=self.spec.outputs, stats=stats, norm=self.norm, **self.io)
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
                self.export(e + 1, val)
        if self.rank0:
            self.say(f"epoch {e + 1}/{t.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "lr")
                + (" (best so far: exported)" if better else ""))
            self.log_epoch(record)
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
        loader = data.batches(url, self.b.rank, shards, 0, t.batch_size, None, seed=t.seed, crop=t.crop,
                              target=task.target, train=False, prefetch=t.prefetch, width=self.spec.outputs,
                              ids=True, norm=self.norm, **self.io) if self.b.rank < shards else iter(())
        with torch.inference_mode():
            for x, y, names in loader:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    logits = model(x.to(self.device)).float()
                y = y.to(self.device)
                if task.loss == "ce":
                    loss_sum += float(F.cross_entropy(logits, y.long(), reduction="sum"))
                    count += len(y)
                else:
                    ok = ~torch.isnan(y).any(1)
                    loss_sum += float(F.binary_cross_entropy_with_logits(logits[ok], y[ok], reduction="sum")
                                      / logits.shape[1]) if bool(ok.any()) else 0.0
                    count += int(ok.sum())
                scores.append(logits.cpu().numpy())
                targets.append(y.cpu().numpy())
                ids += names
        width = self.spec.outputs
        scores_np = np.concatenate(scores) if scores else np.zeros((0, width), np.float32)
        targets_np = np.concatenate(targets) if targets else np.zeros((0,) if task.loss == "ce" else (0, width))
        if task.loss == "bce" and split == "test" and self.spec.staged.table:
            self.write_vectors(ids, torch.sigmoid(torch.from_numpy(scores_np)).numpy(), split)
        parts = self.b.gather((loss_sum, count, scores_np if task.loss == "ce" else None,
                               targets_np if task.loss == "ce" else None))
        total = sum(c for _, c, _, _ in parts)
        out = {"loss": sum(s for s, _, _, _ in parts) / total if total else None, "rows": total}
        if task.loss == "ce":
            out.update(classification(np.concatenate([s for _, _, s, _ in parts]),
                                      np.concatenate([y for _, _, _, y in parts]), self.spec.labels))
        return out

    def write_vectors(self, ids: list[str], vectors: np.ndarray, split: str) -> None:
        """This rank's part of the regressed topic vectors table (post_id, split, topics)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.spec.table_schema
        table = pa.table({"post_id": ids, "split": [split] * len(ids),
                          "topics": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32(), -1))
                          .cast(schema.field("topics").type)}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = f"{self.spec.staged.table.rstrip('/')}/part-{split}-rank{self.b.rank:05d}.parquet"
        storage.write_uri(uri, buf.getvalue(), **self.io)

    # ---- outputs (rank 0) -----------------------------------------------------------------
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

    def export(self, epoch: int, val: dict) -> None:
        """<export>/model.pt ({"model": state_dict, "meta": ...}; dl.models.load_model reads it)
        and model.json (the same meta with the file's sha256 in its card, for people and the
        scoring job: it is model.pt's weights card)."""
        from dl.export import ModelMeta

        meta = self.meta(epoch, val)
        ModelMeta.model_validate(meta)  # what scoring will check it against
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "meta": meta}, buf)
        data = buf.getvalue()
        meta["card"]["sha256"] = hashlib.sha256(data).hexdigest()
        root = self.spec.staged.export.rstrip("/")
        storage.write_uri(f"{root}/model.pt", data, **self.io)
        storage.write_uri(f"{root}/model.json", json.dumps(meta, indent=1, default=str).encode(), **self.io)

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

    def write_json(self, name: str, obj) -> None:
        storage.write_uri(f"{self.spec.staged.report.rstrip('/')}/{name}",
                          json.dumps(obj, indent=1, default=str).encode(), **self.io)

    def log_epoch(self, record: dict) -> None:
        """Metrics so far to metrics.json, TensorBoard and curve.png."""
        from torch.utils.tensorboard import SummaryWriter

        self.write_json("metrics.json", {"history": self.pos["history"], "best": self.pos["best"]})
        if self.writer is None:
            self._events = self._events_dir()
            self.writer = SummaryWriter(self._events, purge_step=record["epoch"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(k, v, record["epoch"])
        self.writer.flush()
        self.upload_events()
        storage.write_uri(f"{self.spec.staged.report.rstrip('/')}/curve.png", curve_png(self.pos["history"], self.t.task),
                          **self.io)

    def _events_dir(self) -> str:
        scheme, path = storage.arrow_path(self.spec.staged.report)
        if scheme == "file":
            os.makedirs(f"{path}/tensorboard", exist_ok=True)
            return f"{path}/tensorboard"
        return tempfile.mkdtemp(prefix="tensorboard-")

    def upload_events(self) -> None:
        """Event files written to a temporary folder go to the report (object-store lakes)."""
        if storage.arrow_path(self.spec.staged.report)[0] == "file":
            return
        for name in os.listdir(self._events):
            with open(os.path.join(self._events, name), "rb") as f:
                storage.write_uri(f"{self.spec.staged.report.rstrip('/')}/tensorboard/{name}", f.read(), **self.io)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def curve_png(history: list[dict], task: str) -> bytes:
    """Loss (train, val) and the task's figure (train, val) per epoch, as a PNG."""
    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h.get("val_loss") for h in history], "o-", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    figure = "top1" if task == "city" else "accuracy"
    if task != "topics":
        axes[1].plot(epochs, [h.get("train_accuracy") for h in history], "o-", label="train")
        axes[1].plot(epochs, [h.get(f"val_{figure}") for h in history], "o-", label="val")
        axes[1].set(title=figure, xlabel="epoch")
    else:
        axes[1].plot(epochs, [h["samples_per_s"] for h in history], "o-", label="step")
        axes[1].plot(epochs, [h["loader_samples_per_s"] for h in history], "o-", label="loader")
        axes[1].set(title="samples/s", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    return png(fig, dpi=90)


def run(spec: TrainSpec) -> dict:
    """The entry point TorchDistributor, torchrun and the inline mode call in every process."""
    return Run(spec).fit()


if __name__ == "__main__":  # torchrun -m dl.train spec.json: a node without Spark (a spec the driver wrote)
    with open(sys.argv[1]) as f:
        figures = run(TrainSpec.from_json(f.read()))["test"]
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(figures, default=str), flush=True)
