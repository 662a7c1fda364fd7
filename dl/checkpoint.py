"""Training checkpoints on a local disk, S3 or GCS, written atomically and loaded with
`weights_only=True` (a checkpoint from elsewhere cannot run code when it is read).

    save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 1200}, root, 1200)
    uri = latest(root)          # <root>/step-000001200.pt, or None before the first save
    state = load(uri)

A reader never sees half a checkpoint: a local file is renamed into place once written, an
object-store upload only becomes visible when complete; `latest` ignores anything else under
root. Torch and pyarrow only, no Spark: training processes under TorchDistributor or torchrun
call it.
"""

from __future__ import annotations

import io
import re

import torch

from core import storage

NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names it and why."""


def name(step: int) -> str:
    return f"step-{step:09d}.pt"


def save(state: dict, root: str, step: int, endpoint: str | None = None, region: str | None = None) -> str:
    """Write state (tensors, numbers, strings, lists, dicts) as <root>/step-<step>.pt; its URI."""
    buf = io.BytesIO()
    torch.save(state, buf)
    uri = f"{storage.qualify(root).rstrip('/')}/{name(step)}"
    storage.write_uri(uri, buf.getvalue(), endpoint, region)
    return uri


def read(uri: str, endpoint: str | None = None, region: str | None = None) -> bytes:
    """The file's bytes; CheckpointError when it is missing or unreadable."""
    try:
        data = storage.read_uri(uri, endpoint, region)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{uri}: cannot read it ({e})") from None
    if data is None:
        raise CheckpointError(f"{uri}: no such file or object")
    return data


def parse(data: bytes, uri: str, map_location: str = "cpu") -> dict:
    """A checkpoint's bytes loaded with weights_only=True; CheckpointError when they are not one."""
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, said in one line
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{uri}: not a torch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri}: expected a dict of state, got {type(state).__name__}")
    return state


def load(uri: str, endpoint: str | None = None, region: str | None = None, map_location: str = "cpu") -> dict:
    """The state saved at uri, loaded with weights_only=True; CheckpointError when it is
    missing, unreadable or not a checkpoint."""
    return parse(read(uri, endpoint, region), uri, map_location)


def _steps(root: str, endpoint: str | None, region: str | None) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), uri) for uri, _ in storage.list_files(root, endpoint, region)
                  if (m := NAME.match(uri.rsplit("/", 1)[-1])))


def latest(root: str, endpoint: str | None = None, region: str | None = None) -> str | None:
    """URI of the newest complete checkpoint under root (by step), None when there is none."""
    found = _steps(root, endpoint, region)
    return found[-1][1] if found else None


def load_latest(root: str, endpoint: str | None = None, region: str | None = None,
                map_location: str = "cpu") -> tuple[str | None, dict | None, list[str]]:
    """(URI, state) of the newest checkpoint under root that loads, and the newer ones that did
    not (a file cut short by a full disk, a bad copy), each as a line saying why; (None, None,
    [...]) when none loads."""
    damaged = []
    for _, uri in reversed(_steps(root, endpoint, region)):
        try:
            return uri, load(uri, endpoint, region, map_location), damaged
        except CheckpointError as e:
            damaged.append(str(e))
    return None, None, damaged


RUN = re.compile(r"^run-(\d{4,})$")


def runs(root: str, endpoint: str | None = None, region: str | None = None) -> list[str]:
    """The run folders under root (<root>/run-NNNN/, one per training run), oldest first."""
    found = set()
    for uri, _ in storage.list_files(root, endpoint, region):
        rel = uri[len(storage.qualify(root).rstrip("/")) + 1:]
        if "/" in rel and RUN.match(rel.split("/", 1)[0]):
            found.add(rel.split("/", 1)[0])
    return [f"{storage.qualify(root).rstrip('/')}/{r}" for r in sorted(found, key=lambda r: int(r[4:]))]


def run_folder(root: str, resume: bool, endpoint: str | None = None, region: str | None = None) -> str:
    """Where a training run keeps its checkpoints: the newest run folder to resume, else a new one
    (the older runs' stay until this one completes: a failed run never costs the last good ones)."""
    have = runs(root, endpoint, region)
    if resume and have:
        return have[-1]
    last = int(have[-1].rsplit("run-", 1)[1]) if have else 0
    return f"{storage.qualify(root).rstrip('/')}/run-{last + 1:04d}"


def prune(root: str, keep: int, endpoint: str | None = None, region: str | None = None) -> None:
    """Delete all but the newest `keep` checkpoints under root."""
    for _, uri in _steps(root, endpoint, region)[:-keep]:
        storage.delete_uri(uri, endpoint, region)
