"""What a training run writes besides its checkpoints, to the run's staged outputs
(dl.spec.TrainSpec.staged; sparkml.cnn.train_cnn publishes them once the run completes):

    <export>/model.pt, model.json        the best epoch's model (rank 0)
    <report>/metrics.json, curve.png     the history so far and the final figures (rank 0)
    <report>/tensorboard/                the epochs' scalars (rank 0)
    <table>/part-test-rank*.parquet      the topics task's regressed test vectors (every rank its own)

dl.train's loop decides when; this module how and where.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import numpy as np
import torch
from torch import nn

from core import storage
from core.figures import png, pyplot
from dl.spec import TrainSpec


class Results:
    def __init__(self, spec: TrainSpec):
        self.spec, self.io = spec, spec.io
        self.report = spec.staged.report.rstrip("/")
        self.writer = None  # TensorBoard's, opened at the first epoch's record
        self._events: str | None = None

    def export(self, model: nn.Module, meta: dict) -> None:
        """<export>/model.pt ({"model": state_dict, "meta": ...}; dl.models.load_model reads it)
        and model.json (the same meta with the file's sha256 in its card, for people and the
        scoring job: it is model.pt's weights card)."""
        from dl.export import ModelMeta

        ModelMeta.model_validate(meta)  # what scoring will check it against
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "meta": meta}, buf)
        data = buf.getvalue()
        meta["card"]["sha256"] = hashlib.sha256(data).hexdigest()
        root = self.spec.staged.export.rstrip("/")
        storage.write_uri(f"{root}/model.pt", data, **self.io)
        storage.write_uri(f"{root}/model.json", json.dumps(meta, indent=1, default=str).encode(), **self.io)

    def write_json(self, name: str, obj) -> None:
        storage.write_uri(f"{self.report}/{name}", json.dumps(obj, indent=1, default=str).encode(), **self.io)

    def log_epoch(self, record: dict, history: list[dict], best: dict | None, task: str) -> None:
        """The history so far to metrics.json, the epoch's scalars to TensorBoard, curve.png redrawn."""
        from torch.utils.tensorboard import SummaryWriter

        self.write_json("metrics.json", {"history": history, "best": best})
        if self.writer is None:
            self._events = self._events_dir()
            self.writer = SummaryWriter(self._events, purge_step=record["epoch"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(k, v, record["epoch"])
        self.writer.flush()
        self.upload_events()
        storage.write_uri(f"{self.report}/curve.png", curve_png(history, task), **self.io)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.upload_events()

    def write_vectors(self, ids: list[str], vectors: np.ndarray, split: str, rank: int) -> None:
        """This rank's part of the regressed topic vectors table (post_id, split, topics)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.spec.table_schema
        table = pa.table({"post_id": ids, "split": [split] * len(ids),
                          "topics": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32(), -1))
                          .cast(schema.field("topics").type)}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = f"{self.spec.staged.table.rstrip('/')}/part-{split}-rank{rank:05d}.parquet"
        storage.write_uri(uri, buf.getvalue(), **self.io)

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
                storage.write_uri(f"{self.report}/tensorboard/{name}", f.read(), **self.io)


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
