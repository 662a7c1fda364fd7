"""Petastorm datasets into training batches, one shard per rank, in an order that depends only
on (seed, epoch): a resumed run sees the same batches as an uninterrupted one.

    p = plan(url, world=2, batch=32)                 # every rank runs p.steps steps per epoch
    for x, y in batches(url, rank, 2, epoch, 32, p.steps, Examples(crop=224, seed=0)):
        ...                                          # x float32 (32, 3, 224, 224) channels_last

Rank r reads the row groups whose index is r mod world (petastorm's sharding); the seed and
epoch shuffle their order and the rows within each. Petastorm's thread and process pools hand
row groups out in completion order, which depends on timing, so the reader runs its one
synchronous worker, in a background thread that decodes ahead of the step into a bounded queue
(libjpeg releases the GIL). Training crops are random `crop` squares of the stored image,
mirrored half of the time, drawn from (seed, epoch, post_id); evaluation takes the centre.

DDP hangs when ranks run different numbers of steps: `plan` gives every rank the same count,
what the smallest shard can fill, and refuses a dataset with fewer row groups than ranks.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dl import models
from dl.models import IMAGENET_MEAN, IMAGENET_STD


# petastorm 0.12 reads through pyarrow's legacy APIs (why pyarrow is pinned below 15) and warns
# about them for every row group it opens.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")


class DatasetTooSmall(ValueError):
    """Fewer row groups than ranks, or not one batch per rank: the message says how to rebuild."""


@dataclass(frozen=True)
class Plan:
    row_groups: int
    rows: int
    steps: int  # per epoch, the same on every rank


def row_group_rows(url: str, endpoint: str | None = None, region: str | None = None) -> list[int]:
    """Rows of every row group of the dataset's Parquet files (footers only)."""
    import pyarrow.parquet as pq

    from core import storage

    scheme, _ = storage.arrow_path(url)
    fs = storage.arrow_filesystem(scheme, endpoint, region)
    out = []
    for uri, _ in storage.list_files(url, endpoint, region):
        if uri.endswith(".parquet"):
            with fs.open_input_file(storage.arrow_path(uri)[1]) as f:
                meta = pq.ParquetFile(f).metadata
                out += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return out


def plan(url: str, world: int, batch: int, endpoint: str | None = None, region: str | None = None) -> Plan:
    """Steps per epoch for `world` ranks at `batch` each: every shard holds at least the
    floor(G / world) smallest row groups, so that many rows are there on every rank."""
    rows = sorted(row_group_rows(url, endpoint, region))
    if len(rows) < world:
        raise DatasetTooSmall(f"{url} has {len(rows)} row groups for {world} ranks: rebuild it with "
                              f"jobs/build_dataset.py --set dataset.ranks={world}")
    per_rank = sum(rows[:len(rows) // world])
    if per_rank < batch:
        raise DatasetTooSmall(f"{url}: the smallest shard of {world} holds {per_rank} rows, fewer than one batch "
                              f"of {batch}: lower the batch size or rebuild with fewer, larger row groups")
    return Plan(row_groups=len(rows), rows=sum(rows), steps=per_rank // batch)


def _rng(seed: int, epoch: int, post_id: str) -> np.random.Generator:
    h = hashlib.blake2b(f"{seed}:{epoch}:{post_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def crop_image(image: np.ndarray, crop: int, rng: np.random.Generator | None) -> np.ndarray:
    """A random crop x crop square mirrored with probability 1/2 (rng given), else the centre."""
    h, w = image.shape[:2]
    if rng is None:
        top, left = (h - crop) // 2, (w - crop) // 2
        return image[top:top + crop, left:left + crop]
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    out = image[top:top + crop, left:left + crop]
    return out[:, ::-1] if rng.random() < 0.5 else out


def normalise(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 channels_last, normalised as dl.models does."""
    return models.normalise(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), mean, std)


def rows(url: str, rank: int, world: int, epoch: int, seed: int, fields: list[str], train: bool,
         endpoint: str | None = None, region: str | None = None) -> Iterator[dict]:
    """The decoded rows of this rank's shard, in an order fixed by (seed, epoch)."""
    from petastorm import make_reader

    from core import storage

    kwargs = {}
    if storage.arrow_path(url)[0] != "file":
        scheme, _ = storage.arrow_path(url)
        kwargs["filesystem"] = storage.arrow_filesystem(scheme, endpoint, region)
    with make_reader(storage.qualify(url), schema_fields=fields, reader_pool_type="dummy", num_epochs=1,
                     cur_shard=rank, shard_count=world, shuffle_row_groups=train, shuffle_rows=train,
                     seed=seed * 1_000_003 + epoch, **kwargs) as reader:
        for row in reader:
            yield row._asdict()


def _target(value, width: int | None) -> np.ndarray:
    """A row's target as an array; a missing soft target (a caption without words) is NaNs."""
    if value is None:
        return np.full(width or 1, np.nan, np.float32)
    return np.asarray(value)


@dataclass(frozen=True)
class Examples:
    """How a dataset row becomes an example: its target column (a soft target that is missing
    becomes `width` NaNs); a `crop` square, random and mirrored half of the time from (seed,
    epoch, post_id) when `train`, else the centre; normalised by `norm`, the (mean, std) of the
    weights' card (dl.weights)."""

    target: str = "label"
    crop: int = 224
    train: bool = True
    seed: int = 0
    width: int | None = None
    norm: tuple = (IMAGENET_MEAN, IMAGENET_STD)


def batches(url: str, rank: int, world: int, epoch: int, batch: int, steps: int | None,
            examples: Examples = Examples(), skip: int = 0, prefetch: int = 4, ids: bool = False,
            stats: dict | None = None, endpoint: str | None = None, region: str | None = None) -> Iterator[tuple]:
    """(images, targets) batches of this rank's shard, (images, targets, post_ids) with ids:
    exactly `steps` of them (all rows, the last batch short, when steps is None), the first
    `skip` passed over (resume mid-epoch). Decoding runs ahead in a background thread, at most
    `prefetch` batches; `stats` gets the rows it decoded and the seconds it was busy (its rate
    when it never waits for the step)."""
    ex = examples
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    counts = stats if stats is not None else {}
    counts.setdefault("rows", 0)
    counts.setdefault("busy_s", 0.0)

    def produce():
        try:
            images, targets, names, n = [], [], [], 0
            t0 = time.perf_counter()
            for row in rows(url, rank, world, epoch, ex.seed, ["post_id", "image", ex.target], ex.train, endpoint,
                            region):
                if stop.is_set() or (steps is not None and n == steps):
                    break
                images.append(crop_image(row["image"], ex.crop,
                                         _rng(ex.seed, epoch, row["post_id"]) if ex.train else None))
                targets.append(_target(row[ex.target], ex.width))
                names.append(row["post_id"])
                if len(images) == batch:
                    if n >= skip:
                        counts["rows"] += batch
                        counts["busy_s"] += time.perf_counter() - t0
                        out.put((np.stack(images), np.stack(targets), names))
                        t0 = time.perf_counter()
                    images, targets, names, n = [], [], [], n + 1
            if images and steps is None and n >= skip:
                counts["rows"] += len(images)
                counts["busy_s"] += time.perf_counter() - t0
                out.put((np.stack(images), np.stack(targets), names))
            out.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            out.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    got = 0
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            images, targets, names = item
            got += 1
            yield (normalise(images, *ex.norm), torch.from_numpy(targets)) + ((names,) if ids else ())
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(0.05)
    if steps is not None and got != steps - skip:
        raise DatasetTooSmall(f"rank {rank} got {got} of {steps - skip} batches from {url}: plan() was computed "
                              "for another dataset or world size")
