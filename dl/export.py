"""The exported model's contract: model.json, written by train_cnn beside model.pt, read by
scoring and by any run that starts from the export. Declared once, here; a model.json that does
not fit it (truncated, edited, from an older version) is one ModelError line, not a traceback.

    meta = parse_meta(raw_bytes, "s3://b/lake/models/city/model.json")   # validated dict
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dl.weights import Card, ModelError

Triple = tuple[float, float, float]


class ExportError(ModelError):
    """A model.json that is not the trainer's: the message names the key and the file."""


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1, description="side of the prepared images the model was trained on")
    crop: int = Field(ge=1, description="centre crop of evaluation and scoring")
    mean: Triple
    std: Triple
    note: str = ""

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than the {self.size} px images")
        return self


class ModelMeta(BaseModel):
    """model.json: what the exported network is, its outputs and the preprocessing it was trained
    with; `card` is model.pt's weights card (dl.weights)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["city", "topics", "likability"]
    model: str
    outputs: int = Field(ge=1)
    labels: list[str] | None
    target: Literal["label", "topics"]
    output: Literal["softmax", "sigmoid"]
    preprocessing: Preprocessing
    card: Card
    epoch: int = Field(ge=1)
    validation: dict
    trained_from: str
    dataset: str
    train: dict

    @model_validator(mode="after")
    def _consistent(self):
        if self.labels is not None and len(self.labels) != self.outputs:
            raise ValueError(f"{len(self.labels)} labels for {self.outputs} outputs")
        if self.card.model != self.model:
            raise ValueError(f"card.model {self.card.model} is not model {self.model}")
        if (list(self.card.mean), list(self.card.std)) != (list(self.preprocessing.mean), list(self.preprocessing.std)):
            raise ValueError(f"preprocessing normalises by {list(self.preprocessing.mean)} / "
                             f"{list(self.preprocessing.std)}, its weights card by {list(self.card.mean)} / "
                             f"{list(self.card.std)}")
        return self


def parse_meta(raw: bytes | dict, where: str) -> dict:
    """model.json's content, validated against ModelMeta; ExportError naming the problem."""
    try:
        obj = raw if isinstance(raw, dict) else json.loads(raw)
    except ValueError as e:
        raise ExportError(f"{where} is not JSON ({e}): export the model again with jobs/train_cnn.py") from None
    try:
        return ModelMeta.model_validate(obj).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "model.json"
        what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ExportError(f"{where}: {loc}: {what}; export the model again with jobs/train_cnn.py") from None
