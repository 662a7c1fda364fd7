"""Pretrained weights as an input: the network's state and the card that says how to use it.

    c = card("mobilenet_v2", "s3://b/weights/mobilenet_v2_imagenet.pth")
    c.preprocessing      # Preprocessing(resize=256, crop=224, mean=(0.5,)*3, std=(0.5,)*3)
    c.labels             # the 1000 ImageNet class names its head predicts, or None
    c.batchnorm          # "folded": batch norm must stay in eval mode when fine-tuning

`weights` is one of
- `none`: random init from a seed (tests of mechanics), torchvision's ImageNet mean/std;
- `imagenet`: the model's DEFAULT torchvision weight enum, its transform and class names;
  downloaded into TORCH_HOME, or read from there without a network (pre-fill
  $TORCH_HOME/hub/checkpoints on a machine with internet, or stage the file, below);
- the URI (local, s3://, gs://) of a torch.save'd state_dict with any head, whose card is the
  JSON file of the same name beside it (`x.pth` -> `x.json`); a model train_cnn exported
  (model.pt) has its card in the model.json beside it.

A card (`Card`) holds the architecture, the input normalisation ((x / 255 - mean) / std), the
resize and crop of extraction, the head's class names ("imagenet" for torchvision's 1000),
whether batch norm was folded into the convolutions, builder arguments the weights need
(GoogLeNet's transform_input) and the file's sha256. Without a card a state_dict is refused:
weights fed the wrong normalisation still run, and silently lose accuracy (docs/weights.md).

Staging weights for a cluster without internet (writes the file and its card, checks both):

    python -m dl.weights stage ../shared/data/weights/mobilenet_v2_imagenet.pth s3://bucket/weights/
    python -m dl.weights stage imagenet --model alexnet gs://bucket/weights/   # from torchvision
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Cards of weights files the project knows by content (the ones in ../shared/data/weights): staging
# one of them needs no options.
KNOWN = Path(__file__).resolve().parents[1] / "conf" / "weights"
# torchvision builders that normalise their input inside when given transform_input (their
# ImageNet weights were trained that way)
TRANSFORM_INPUT = ("googlenet", "inception_v3")


class ModelError(ValueError):
    """A model, weights or layer that cannot be had: the message says what to give instead."""


class WeightsError(ModelError):
    """Weights that cannot be used as given: the message says what to give instead."""


Triple = tuple[float, float, float]


class Card(BaseModel):
    """What a weights file needs to be used right; the JSON beside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="torchvision architecture the state_dict loads into (strictly)")
    mean: Triple = Field(description="per-channel mean of x / 255 that the weights expect to be subtracted")
    std: Triple = Field(description="per-channel divisor after the mean")
    resize: int = Field(256, ge=8, description="shorter side before the centre crop (feature extraction)")
    crop: int = Field(224, ge=8, description="input side the weights were trained at")
    categories: Literal["imagenet"] | list[str] | None = Field(
        None, description="names of the head's outputs: 'imagenet' (torchvision's 1000 classes), a list, or none")
    batchnorm: Literal["trained", "folded"] = Field(
        "trained", description="folded: batch norm was folded into the convolutions (identity statistics): it "
                               "must stay in eval mode when fine-tuning")
    kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="torchvision builder arguments the weights need (transform_input)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="of the weights file")
    source: str = Field("", description="provenance, for people")

    @field_validator("std")
    @classmethod
    def _positive(cls, v: Triple) -> Triple:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @property
    def labels(self) -> list[str] | None:
        if self.categories == "imagenet":
            from torchvision.models._meta import _IMAGENET_CATEGORIES

            return list(_IMAGENET_CATEGORIES)
        return self.categories

    @property
    def normalisation(self) -> dict:
        """What model.json, features summaries and scoring compare."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @property
    def preprocessing(self):
        from dl.models import Preprocessing

        return Preprocessing(resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)


def sidecar(uri: str) -> str:
    """The card's URI: the weights' name with .json for its extension."""
    head, _, name = uri.rpartition("/")
    stem = re.sub(r"\.[^.]*$", "", name) if "." in name.lstrip(".") else name
    return f"{head}/{stem}.json" if head else f"{stem}.json"


def parse_card(raw: bytes | str | dict, where: str) -> Card:
    """A card from JSON (a card, or a model.json holding one under "card"); WeightsError."""
    try:
        obj = raw if isinstance(raw, dict) else json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"{where} is not JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("card"), dict):
        obj = obj["card"]
    try:
        return Card.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(map(str, first["loc"])) or "the card"
        raise WeightsError(f"{where}: {loc}: {first['msg']}") from None


def imagenet_card(name: str) -> Card:
    """The card of torchvision's DEFAULT weights of the model (their transform and classes)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no imagenet weights for {name}") from None
    t = enum.transforms()
    cats = enum.meta.get("categories")
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return Card(model=name, mean=tuple(t.mean), std=tuple(t.std), resize=int(t.resize_size[0]),
                crop=int(t.crop_size[0]), categories="imagenet" if list(cats or []) == list(_IMAGENET_CATEGORIES)
                else cats, kwargs={"transform_input": True} if name in TRANSFORM_INPUT else {},
                source=f"torchvision {enum} ({enum.url})")


def random_card(name: str) -> Card:
    return Card(model=name, mean=IMAGENET_MEAN, std=IMAGENET_STD, source="random init (weights: none)")


def card(name: str, weights: str, endpoint: str | None = None, region: str | None = None) -> Card:
    """The card of `weights` for model `name`; WeightsError when there is none or it is for
    another architecture."""
    if weights == "none":
        return random_card(name)
    if weights == "imagenet":
        return imagenet_card(name)
    from core import storage

    where = sidecar(weights)
    try:
        raw = storage.read_uri(where, endpoint, region)
    except (OSError, ValueError) as e:
        raise WeightsError(f"weights {weights}: cannot read its card {where} ({e})") from None
    if raw is None:
        raise WeightsError(
            f"weights {weights} have no card {where} saying the input normalisation they expect: stage them with "
            f"`python -m dl.weights stage {weights} <folder> --model {name} --mean R,G,B --std R,G,B` "
            "(docs/weights.md)")
    c = parse_card(raw, where)
    if c.model != name:
        raise WeightsError(f"weights {weights} are {c.model} weights (its card {where}), not {name}")
    return c


def read_state(uri: str, c: Card, endpoint: str | None = None, region: str | None = None) -> dict:
    """The state_dict at uri (weights_only=True), checked against the card's sha256 and for
    non-finite values; WeightsError naming the problem."""
    import torch

    from dl.checkpoint import CheckpointError, parse, read

    try:
        data = read(uri, endpoint, region)
        digest = hashlib.sha256(data).hexdigest()
        if c.sha256 and digest != c.sha256:
            raise WeightsError(f"weights {uri}: sha256 {digest[:12]}... is not the {c.sha256[:12]}... of its card: "
                               "the file is damaged or another one; stage it again")
        state = parse(data, uri)
    except CheckpointError as e:
        raise WeightsError(f"weights {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict, ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights {uri}: not a state_dict (a mapping of parameter names to tensors)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"weights {uri}: {len(bad)} tensors hold NaN or infinite values ({bad[0]}, ...)")
    return state


def known_card(data: bytes) -> Card | None:
    """The card in conf/weights/ whose sha256 is this file's."""
    digest = hashlib.sha256(data).hexdigest()
    for path in sorted(KNOWN.glob("*.json")):
        c = parse_card(path.read_bytes(), str(path))
        if c.sha256 == digest:
            return c
    return None


def _triple(text: str) -> Triple:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError("three comma-separated numbers (R,G,B)")
    return tuple(parts)


def stage(source: str, dest: str, model: str | None = None, name: str | None = None, mean: Triple | None = None,
          std: Triple | None = None, resize: int | None = None, crop: int | None = None,
          categories: str | None = None, batchnorm: str | None = None, endpoint: str | None = None,
          region: str | None = None) -> tuple[str, Card]:
    """Copy weights (a state_dict file, or `imagenet` for torchvision's) to dest with their card,
    after loading them into the architecture; (the weights' URI, the card)."""
    import io

    import torch

    from core import storage

    if source == "imagenet":
        if not model:
            raise WeightsError("stage imagenet needs --model (a torchvision classifier)")
        from dl.models import load_model

        try:
            net = load_model(model, "imagenet")
        except ModelError as e:
            raise WeightsError(str(e)) from None
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        data, base = buf.getvalue(), imagenet_card(model)
        name = name or f"{model}_imagenet"
    else:
        data = storage.read_uri(source, endpoint, region)
        if data is None:
            raise WeightsError(f"weights {source}: no such file or object")
        base = known_card(data)
        name = name or re.sub(r"\.[^.]*$", "", source.rstrip("/").rsplit("/", 1)[-1])
    given = {k: v for k, v in {"model": model, "mean": mean, "std": std, "resize": resize, "crop": crop,
                               "categories": categories, "batchnorm": batchnorm}.items() if v is not None}
    if base is None and not {"model", "mean", "std"} <= set(given):
        raise WeightsError(f"{source} is not a file the project knows (conf/weights/): say what it is with --model, "
                           "--mean and --std (and --categories imagenet for an ImageNet head)")
    fields = {**(base.model_dump() if base else {"source": f"staged from {source}"}), **given,
              "sha256": hashlib.sha256(data).hexdigest()}
    try:
        c = Card.model_validate(fields)
    except ValidationError as e:
        raise WeightsError(f"card: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    root = storage.qualify(dest).rstrip("/")
    uri = f"{root}/{name}.pth"
    storage.write_uri(uri, data, endpoint, region)
    storage.write_uri(sidecar(uri), json.dumps(c.model_dump(), indent=1).encode(), endpoint, region)
    from dl.models import load_model

    try:  # read back through the same path every job takes
        load_model(c.model, uri, endpoint=endpoint, region=region)
    except ModelError as e:
        for u in (uri, sidecar(uri)):
            storage.delete_uri(u, endpoint, region)
        raise WeightsError(str(e)) from None
    return uri, c


def describe(c: Card) -> str:
    """One line for logs: which weights, from where, with which normalisation."""
    return (f"{c.model}, {c.source or 'no source given'}; input (x/255 - {list(c.mean)}) / {list(c.std)}"
            + (f", batch norm {c.batchnorm}" if c.batchnorm != "trained" else "")
            + (f", sha256 {c.sha256[:12]}" if c.sha256 else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dl.weights", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage", help="copy weights and their card to a folder (local, s3://, gs://)")
    st.add_argument("source", help="a state_dict file (local, s3://, gs://) or 'imagenet' (torchvision's, --model)")
    st.add_argument("dest", help="folder URI to copy to")
    st.add_argument("--model", help="torchvision architecture (known files need none)")
    st.add_argument("--name", help="file name without extension (default: the source's)")
    st.add_argument("--mean", type=_triple, help="R,G,B mean of x/255 the weights expect")
    st.add_argument("--std", type=_triple, help="R,G,B std")
    st.add_argument("--resize", type=int)
    st.add_argument("--crop", type=int)
    st.add_argument("--categories", choices=["imagenet"], help="the head predicts torchvision's 1000 classes")
    st.add_argument("--batchnorm", choices=["trained", "folded"])
    st.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, moto)")
    st.add_argument("--region")
    args = ap.parse_args(argv)
    try:
        uri, c = stage(args.source, args.dest, args.model, args.name, args.mean, args.std, args.resize, args.crop,
                       args.categories, args.batchnorm, args.s3_endpoint, args.region)
    except WeightsError as e:
        print(f"dl.weights: error: {e}", file=sys.stderr)
        return 2
    print(f"staged {uri} ({describe(c)}); use it as weights: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
