"""dl.models: models by name and weights, Caffe-named feature layers that stop where asked,
and one preprocessing definition that matches torchvision's own transform."""

import io
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dl.models import FeatureExtractor, ModelError, Preprocessing, load_model, preprocessing
from tests.conftest import ROOT

PHOTOS = sorted((ROOT.parent / "shared" / "data" / "photos").glob("*.jpg"))


def _images(n: int, side: int | None = 300) -> list[np.ndarray]:
    assert len(PHOTOS) == 396, "../shared/data/photos must be beside the repository"
    out = []
    for p in PHOTOS[:n]:
        im = Image.open(p).convert("RGB")
        out.append(np.asarray(im.resize((side, side)) if side else im))
    return out


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return load_model("alexnet", "none")


def test_fc6_fc7_are_the_relus_after_the_first_two_fully_connected_layers(alexnet):
    x = Preprocessing()(np.stack(_images(4)))
    with torch.inference_mode():
        got = FeatureExtractor(alexnet, ("fc6", "fc7"))(x)
        flat = torch.flatten(alexnet.avgpool(alexnet.features(x)), 1)
        fc6 = alexnet.classifier[:3](flat)   # dropout (off in eval), linear, relu
        fc7 = alexnet.classifier[:6](flat)
    assert got["fc6"].shape == (4, 4096) and got["fc7"].shape == (4, 4096)
    torch.testing.assert_close(got["fc6"], fc6)
    torch.testing.assert_close(got["fc7"], fc7)
    assert (got["fc7"] == 0).any() and (got["fc7"] > 0).any()  # after the ReLU: rectified, not all zero


def test_the_extractor_does_not_run_the_layers_above_the_one_asked_for(alexnet):
    calls = []
    hooks = [alexnet.classifier[i].register_forward_hook(lambda *a, i=i: calls.append(i)) for i in (4, 6)]
    try:
        fx = FeatureExtractor(alexnet, ("fc6",))
        with torch.inference_mode():
            fx(torch.zeros(1, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    names = {n for n, _ in fx.body.named_modules()}
    assert "classifier.4" not in names and "classifier.6" not in names and "classifier.1" in names
    assert calls == []


def test_vgg_and_prelogit_layers():
    vgg = load_model("vgg11", "none")
    fx = FeatureExtractor(vgg, ("fc6", "fc7"))
    assert {n for n, _ in fx.body.named_modules()} >= {"classifier.1", "classifier.4"}
    assert "classifier.6" not in {n for n, _ in fx.body.named_modules()}
    resnet = load_model("resnet18", "none")
    with torch.inference_mode():
        out = FeatureExtractor(resnet, ("prelogit",))(torch.zeros(2, 3, 224, 224))["prelogit"]
        want = torch.flatten(resnet.avgpool(resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(
            resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(torch.zeros(2, 3, 224, 224)))))))))), 1)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, want)
    with pytest.raises(ModelError, match="use prelogit"):
        FeatureExtractor(resnet, ("fc7",))
    with pytest.raises(ModelError, match="unknown layer"):
        FeatureExtractor(resnet, ("pool5",))


def test_checkpoints_load_from_a_path_and_from_s3(tmp_path, moto_endpoint):
    """A state_dict saved as training saves it ({"model": ..., "epoch": 3}) beside its card."""
    import json

    import boto3

    from dl.weights import Card

    small = load_model("squeezenet1_1", "none")  # 5 MB: the moto server holds objects in memory
    buf = io.BytesIO()
    torch.save({"model": small.state_dict(), "epoch": 3}, buf)
    c = json.dumps(Card(model="squeezenet1_1", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).model_dump()).encode()
    (tmp_path / "ckpt.pt").write_bytes(buf.getvalue())
    (tmp_path / "ckpt.json").write_bytes(c)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="squeezenet/ckpt.pt", Body=buf.getvalue())
    s3.put_object(Bucket="models", Key="squeezenet/ckpt.json", Body=c)
    for uri, kw in ((str(tmp_path / "ckpt.pt"), {}), ("s3://models/squeezenet/ckpt.pt", {"endpoint": moto_endpoint})):
        loaded = load_model("squeezenet1_1", uri, **kw)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))
        assert not loaded.training
        assert preprocessing("squeezenet1_1", uri, **kw) == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    (tmp_path / "missing.json").write_bytes(c)
    with pytest.raises(ModelError, match="no such file"):
        load_model("squeezenet1_1", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.json").write_bytes(c)
    with pytest.raises(ModelError, match="not a torch checkpoint"):
        load_model("squeezenet1_1", str(tmp_path / "junk.pt"))
    (tmp_path / "alex.pt").write_bytes(buf.getvalue())
    (tmp_path / "alex.json").write_bytes(c.replace(b"squeezenet1_1", b"alexnet"))
    with pytest.raises(ModelError, match="do not fit alexnet"):
        load_model("alexnet", str(tmp_path / "alex.pt"))
    with pytest.raises(ModelError, match="unknown model"):
        load_model("alexnett", "none")


def test_imagenet_weights_without_internet_is_a_clear_error(monkeypatch):
    # The weights' host cannot be reached from here: the download is replaced by its failure
    # (the one stand-in in these tests, for an external service).
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable, raising=False)
    with pytest.raises(ModelError, match="needs internet access"):
        load_model("alexnet", "imagenet")


def test_preprocessing_matches_torchvisions_transform():
    """Equal to torchvision's v2 transforms on uint8 image tensors (the same antialiased uint8
    resize kernel), and within one grey level of the weights' own v1 transform, which resizes
    the image as float and rounds back."""
    from torchvision.transforms import v2

    ref = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    pre = preprocessing("alexnet", "imagenet")
    assert (pre.resize, pre.crop) == (256, 224) and pre == preprocessing("alexnet", "none")
    modern = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(ref.mean, ref.std)])
    square, odd = _images(3), _images(3, side=None)  # 300x300 as prepared, and the photos' own sizes
    for batch in (np.stack(square), odd):
        got = pre(batch)
        assert got.shape == (3, 3, 224, 224) and got.is_contiguous(memory_format=torch.channels_last)
        want = torch.stack([modern(torch.from_numpy(np.array(a)).permute(2, 0, 1)) for a in batch])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        want = torch.stack([ref(torch.from_numpy(np.array(a)).permute(2, 0, 1)) for a in batch])
        # one uint8 level is 1 / (255 * 0.225) ~ 0.017 after normalising
        assert (got - want).abs().max() <= 0.018 and (got - want).abs().mean() < 0.005


def test_extract_runs_without_spark_and_bf16_autocast_stays_close_to_float32():
    """sparkml.extract_features.extract is the function a GPU box without Spark runs; under bfloat16
    autocast its features keep cosine > 0.99 with the float32 ones (bf16 has 8 mantissa bits)."""
    from sparkml.extract_features import device, extract

    images = _images(4)
    fp32 = extract(images, "alexnet", "none", ("fc6", "fc7"), True)
    bf16 = extract(images, "alexnet", "none", ("fc6", "fc7"), True, precision="bf16")
    assert device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(fp32) == {(l, m) for l in ("fc6", "fc7") for m in (False, True)}
    for key, a in fp32.items():
        b = bf16[key]
        assert a.shape == b.shape == (4, 4096) and a.dtype == b.dtype == np.float32
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert (cos > 0.99).all() and not np.array_equal(a, b), key
    # the mirrored rows are the features of the flipped images
    flipped = extract([np.ascontiguousarray(a[:, ::-1]) for a in images], "alexnet", "none", ("fc7",), False)
    np.testing.assert_allclose(flipped[("fc7", False)], fp32[("fc7", True)], rtol=1e-3, atol=1e-4)
