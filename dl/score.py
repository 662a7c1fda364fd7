"""Scoring with the CNNs train_cnn exported: the model loaded once per worker process, a
whole batch of prepared images through it in one forward pass. Torch only (no Spark), so the
same function scores on an executor, on a GPU box or in a notebook.

    exported = read_exported("s3://b/run1/models/city")   # model.json (+ its version)
    logits = predict(images, exported)                      # (N, outputs)
    probs = probabilities(logits, exported)                 # softmax, or sigmoid for topics

`images` are what prepare_images makes (size x size RGB uint8, decoded from its JPEG); the
centre crop and the normalisation are the training job's evaluation transform (dl.data), so a
score here equals the training job's own evaluation of the same image.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from core import storage
from dl import data, models


@dataclass(frozen=True)
class Exported:
    """An exported model: where it is, its model.json, and a version (a digest of model.json:
    a retrained model gets a new one, a rerun of the same training the same)."""

    root: str
    meta: dict
    version: str

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("labels")


def read_exported(root: str, endpoint: str | None = None, region: str | None = None) -> Exported | None:
    """The model exported under root (model.json and model.pt), None when there is none;
    dl.export.ExportError when its model.json does not fit the trainer's schema."""
    from dl.export import parse_meta

    root = storage.qualify(root).rstrip("/")
    raw = storage.read_uri(f"{root}/model.json", endpoint, region)
    if raw is None or storage.read_uri(f"{root}/{storage.SUMMARY_FILE}", endpoint, region) is None:
        return None  # not exported, or a training run that has not finished
    return Exported(root, parse_meta(raw, f"{root}/model.json"), hashlib.blake2b(raw, digest_size=6).hexdigest())


@functools.lru_cache(maxsize=4)
def _network(root: str, version: str, endpoint: str | None, region: str | None, on: str) -> torch.nn.Module:
    """The exported network on device `on`, eval mode, channels_last: built once per process
    (per version, so a retrained model in the same worker is loaded again)."""
    exported = read_exported(root, endpoint, region)
    meta = exported.meta
    net = models.load_model(meta["model"], f"{root}/model.pt", num_classes=meta["outputs"], endpoint=endpoint,
                            region=region)  # its card (builder arguments, sha256) is the model.json beside it
    return net.eval().to(on, memory_format=torch.channels_last)


def predict(images: np.ndarray, exported: Exported, endpoint: str | None = None, region: str | None = None,
            on: str = "cpu") -> np.ndarray:
    """(N, outputs) float32 logits of N prepared images (N, size, size, 3) uint8."""
    pre = exported.meta["preprocessing"]
    net = _network(exported.root, exported.version, endpoint, region, on)
    crops = np.stack([data.crop_image(im, pre["crop"], None) for im in images])
    x = data.normalise(crops, tuple(pre["mean"]), tuple(pre["std"])).to(on)
    with torch.inference_mode():
        return net(x).float().cpu().numpy()


def probabilities(logits: np.ndarray, exported: Exported) -> np.ndarray:
    """Softmax over the classes, or a sigmoid per output (the topics regressor), as trained."""
    t = torch.from_numpy(logits)
    return (torch.softmax(t, 1) if exported.meta["output"] == "softmax" else torch.sigmoid(t)).numpy()
