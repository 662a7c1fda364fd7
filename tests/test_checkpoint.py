"""dl.checkpoint: atomic saves to a local disk and to S3 (moto), weights_only loads, latest."""

import os

import pytest
import torch

from dl import checkpoint
from dl.models import load_model


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = load_model("squeezenet1_1", "none", seed=step)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": 1,
            "rng": {"torch": torch.get_rng_state()}, "config": {"lr": 0.01, "layers": ["fc7"]}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_and_latest(where, tmp_path, moto_endpoint):
    import boto3

    if where == "s3":
        boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="ckpt")
        root, kw = "s3://ckpt/run1", {"endpoint": moto_endpoint}
    else:
        root, kw = str(tmp_path / "run1"), {}
    assert checkpoint.latest(root, **kw) is None
    states = {step: _state(step) for step in (5, 40)}
    for step, state in states.items():
        uri = checkpoint.save(state, root, step, **kw)
        assert uri.endswith(f"/step-{step:09d}.pt")
    assert checkpoint.latest(root, **kw).endswith("/step-000000040.pt")
    for step, state in states.items():
        got = checkpoint.load(f"{root}/{checkpoint.name(step)}", **kw)
        assert _equal(got, state) and got["step"] == step
    # the loaded optimizer state restores an optimizer
    model = load_model("squeezenet1_1", "none")
    model.load_state_dict(states[40]["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.load_state_dict(checkpoint.load(checkpoint.latest(root, **kw), **kw)["optimizer"])
    assert _equal(opt.state_dict()["state"], states[40]["optimizer"]["state"])


def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    checkpoint.save({"step": 1}, root, 1)

    def killed(src, dst):  # the process dies after writing, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2}, root, 2)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "step-000000002.pt").exists()
    assert any(p.name.startswith(".step-000000002.pt") for p in (tmp_path / "run").iterdir())  # the torn write
    assert checkpoint.latest(root).endswith("/step-000000001.pt")
    (tmp_path / "run" / "step-000000003.pt.partial").write_bytes(b"x")
    assert checkpoint.latest(root).endswith("/step-000000001.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_load_refuses_code_and_junk(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a torch checkpoint"):
        checkpoint.load(str(tmp_path / "evil.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a torch checkpoint"):
        checkpoint.load(str(tmp_path / "junk.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.load(str(tmp_path / "missing.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(checkpoint.CheckpointError, match="expected a dict"):
        checkpoint.load(str(tmp_path / "list.pt"))
