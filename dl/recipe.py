"""The recipe of a training run, as the loop uses it: what each task learns and how the best
epoch is picked (TASKS), the model with its new head and frozen modules (build), the optimizer
and learning-rate schedule, the loss (soft targets masked where a post has no caption topics)
and the classification figures. Torch only; `t` is the validated train.* section
(core.config.Train).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dl import models


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


def masked_bce(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Sigmoid cross-entropy on soft targets over the rows whose target is known (a post without
    caption topics has NaN ones), and how many rows counted. mean: per value (the training
    loss; 0 but still in the graph when no row counts: DDP expects every parameter used);
    sum: each row's mean over the topics, summed (evaluation adds rows up over batches)."""
    ok = ~torch.isnan(target).any(1)
    rows = int(ok.sum())
    if rows == 0:
        return (logits.sum() * 0.0 if reduction == "mean" else logits.new_zeros(())), 0
    if reduction == "mean":
        return F.binary_cross_entropy_with_logits(logits[ok], target[ok]), rows
    return F.binary_cross_entropy_with_logits(logits[ok], target[ok], reduction="sum") / logits.shape[1], rows


def loss_fn(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of the batch; soft targets that are missing (NaN rows) do not count."""
    logits = logits.float()
    if task.loss == "ce":
        return F.cross_entropy(logits, target.long())
    return masked_bce(logits, target)[0]


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
