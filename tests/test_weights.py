"""dl.weights: real ImageNet weights (../shared/data/weights) with their cards. The card's
normalisation is what makes them work; a checkpoint with any head (ImageNet's 1000 classes)
loads and gets a k-class head, Linear or SqueezeNet's convolution, from a path or from S3;
`imagenet` reads a pre-filled TORCH_HOME without a network; bad weights are one clear line."""

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dl.models import FeatureExtractor, ModelError, Preprocessing, head, load_model, preprocessing
from dl.weights import WeightsError, card, sidecar, stage
from tests.conftest import SHARED, run_job

SHIPPED = SHARED / "data" / "weights"
ANT, BEE = 310, 309  # torchvision's ImageNet class indices


@pytest.fixture(scope="module")
def photos_rgb(photos):
    """Every third photo (132: 64 ants, 68 bees) as RGB arrays, with its ImageNet class."""
    chosen = photos[::3]
    return ([np.asarray(Image.open(p).convert("RGB")) for p in chosen],
            np.array([ANT if p.name.startswith("ants") else BEE for p in chosen]))


def _top1(net, pre: Preprocessing, images, truth) -> float:
    with torch.inference_mode():
        logits = torch.cat([net(pre(images[i:i + 33])) for i in range(0, len(images), 33)])
    return float((logits.argmax(1).numpy() == truth).mean())


@pytest.mark.slow
def test_the_cards_normalisation_is_what_makes_the_shipped_weights_work(weights, photos_rgb):
    """On real ant and bee photos the shipped networks name the insect with the normalisation of
    their card (MobileNetV2 x/127.5 - 1, SqueezeNet the Caffe mean); torchvision's usual ImageNet
    mean/std, which a loader without cards would feed them, loses MobileNetV2 accuracy and leaves
    SqueezeNet at nothing (the README of ../shared/data/weights: 0.780 -> 0.672, 0.629 -> 0.000
    on all 396)."""
    images, truth = photos_rgb
    imagenet = Preprocessing()
    figures = {}
    for model in ("mobilenet_v2", "squeezenet1_0"):
        net = load_model(model, weights[model])
        c = card(model, weights[model])
        assert c.labels[ANT] == "ant" and c.labels[BEE] == "bee"
        figures[model] = (_top1(net, preprocessing(model, weights[model]), images, truth),
                          _top1(net, imagenet, images, truth))
    right, wrong = figures["mobilenet_v2"]
    assert right >= 0.72 and right - wrong >= 0.05, figures
    right, wrong = figures["squeezenet1_0"]
    assert right >= 0.55 and wrong <= 0.05, figures


def _same_backbone(a: torch.nn.Module, b: torch.nn.Module, head_path: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        if not k.startswith(head_path + "."):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("model,head_type", [("mobilenet_v2", torch.nn.Linear), ("squeezenet1_0", torch.nn.Conv2d)])
def test_a_1000_class_checkpoint_gets_a_k_class_head_from_a_path_and_from_s3(model, head_type, weights, photos_rgb,
                                                                            moto_endpoint, tmp_path):
    """A staged ImageNet checkpoint loads with its own 1000-way head, then gets a 3-way one
    (SqueezeNet's is a 1x1 convolution, not a Linear): everything else is the file's, its
    prelogit features (SqueezeNet's map averaged over positions) are the 1000-class network's."""
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=f"weights-{model.replace('_', '-')}")
    s3_uri, s3_card = stage(weights[model], f"s3://weights-{model.replace('_', '-')}/imagenet", name=model,
                            endpoint=moto_endpoint)
    assert s3_card == card(model, weights[model])
    full = load_model(model, weights[model])
    path, layer = head(full)
    assert isinstance(layer, head_type) and (layer.out_features if head_type is torch.nn.Linear
                                            else layer.out_channels) == 1000
    x = preprocessing(model, weights[model])(photos_rgb[0][:4])
    with torch.inference_mode():
        want = FeatureExtractor(full, ("prelogit",))(x)["prelogit"]
        if model == "squeezenet1_0":
            torch.testing.assert_close(want, full.features(x).mean((2, 3)))
    for uri, kw in ((weights[model], {}), (s3_uri, {"endpoint": moto_endpoint})):
        net = load_model(model, uri, num_classes=3, seed=5, **kw)
        _, new = head(net)
        assert isinstance(new, head_type) and not net.training
        with torch.inference_mode():
            assert net(x).shape == (4, 3)
            torch.testing.assert_close(FeatureExtractor(net, ("prelogit",))(x)["prelogit"], want)
        _same_backbone(net, full, path)
    again = load_model(model, weights[model], num_classes=3, seed=5)  # the new head is seeded
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def test_imagenet_weights_come_from_a_prefilled_torch_home_without_a_network(monkeypatch, tmp_path):
    """`imagenet` on a cluster without internet: torchvision's file in $TORCH_HOME/hub/checkpoints
    is used as it is (downloads fail here, and are refused); staging it writes the card of
    torchvision's weights (its own mean/std and classes)."""
    import torchvision

    enum = torchvision.models.MobileNet_V2_Weights.DEFAULT
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    ckpt.parent.mkdir(parents=True)
    shutil.copy(SHIPPED / "mobilenet_v2_imagenet.pth", ckpt)  # any state of the right shape stands in for it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    net = load_model("mobilenet_v2", "imagenet")
    want = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in want.items())
    uri, c = stage("imagenet", str(tmp_path / "staged"), model="mobilenet_v2")
    assert c.mean == (0.485, 0.456, 0.406) and c.categories == "imagenet" and c.resize == 232
    assert c.sha256 == hashlib.sha256((tmp_path / "staged" / "mobilenet_v2_imagenet.pth").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "staged" / "mobilenet_v2_imagenet.json").read_text())["model"] == "mobilenet_v2"


def _copy(weights: dict, which: str, to, data: bytes | None = None, **card_changes):
    """A staged copy of the shipped weights at `to` (its bytes replaced by data), its card changed."""
    to.mkdir(parents=True, exist_ok=True)
    src = weights[which].removeprefix("file://")
    (to / "w.pth").write_bytes(data if data is not None else open(src, "rb").read())
    fields = {**json.loads(open(sidecar(src)).read()), **card_changes}
    (to / "w.json").write_text(json.dumps(fields))
    return str(to / "w.pth")


def _bare(to, data: bytes) -> str:
    to.mkdir(parents=True)
    (to / "bare.pth").write_bytes(data)
    return str(to / "bare.pth")


def test_bad_weights_are_refused_with_what_to_do(weights, tmp_path):
    good = open(weights["mobilenet_v2"].removeprefix("file://"), "rb").read()
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    nan = io.BytesIO()
    torch.save(state, nan)
    cases = {
        "no card": (lambda p: _bare(p, good), "have no card"),
        "damaged": (lambda p: _copy(weights, "mobilenet_v2", p, good[:-1000] + b"x" * 1000), "sha256"),
        "truncated, no sha256": (lambda p: _copy(weights, "mobilenet_v2", p, good[:len(good) // 2], sha256=None),
                                 "not a torch checkpoint"),
        "NaN": (lambda p: _copy(weights, "mobilenet_v2", p, nan.getvalue(), sha256=None), "NaN or infinite"),
        "another model's card": (lambda p: _copy(weights, "mobilenet_v2", p, model="squeezenet1_0"),
                                 "are squeezenet1_0 weights .*, not mobilenet_v2"),
        "another model's file": (lambda p: _copy(weights, "squeezenet1_0", p, model="mobilenet_v2", sha256=None),
                                 "do not fit mobilenet_v2"),
        "card with a zero std": (lambda p: _copy(weights, "mobilenet_v2", p, std=[0.5, 0, 0.5]), "std"),
        "card with an unknown key": (lambda p: _copy(weights, "mobilenet_v2", p, mean_rgb=[1, 2, 3]), "mean_rgb"),
    }
    for name, (make, said) in cases.items():
        uri = make(tmp_path / name.replace(" ", "_"))
        with pytest.raises(ModelError, match=said):
            load_model("mobilenet_v2", uri)
    with pytest.raises(WeightsError, match="is not a file the project knows"):
        stage(str(tmp_path / "NaN" / "w.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_job_given_bad_weights_exits_2_with_one_line(weights, tmp_path, capsys):
    """The weights are checked before any input is read or any output touched (train_cnn's own
    case: tests/test_train.py)."""
    damaged = _copy(weights, "mobilenet_v2", tmp_path / "d", b"\0" * 100)
    for job in ("extract_features", "explore"):
        capsys.readouterr()
        rc = run_job(job, "--set", f"lake={tmp_path / 'lake'}", "--set", f"features.weights={damaged}",
                     "--set", f"explore.weights={damaged}")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "sha256" in err[0] and damaged in err[0], (job, err)
