"""What the driver (sparkml.cnn.train_cnn.spec) hands every training process: one TrainSpec, picklable
for TorchDistributor and Horovod, and JSON for `torchrun -m dl.train spec.json` on a node without
Spark. It carries the recipe (the validated train.* section), the dataset, where each output goes
and what a resumed run continues from.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa

from core.config import Train

INCOMING = ".incoming"  # a training run's outputs until it completes (beside the published ones)


@dataclass(frozen=True)
class Outputs:
    """A run's outputs: the model folder (model.pt, model.json), the report folder (metrics,
    curve, TensorBoard) and, for the topics task, the table of regressed test vectors."""

    export: str
    report: str
    table: str | None = None

    def staged(self) -> Outputs:
        """The same outputs beside the published ones, where a run writes until it completes."""
        return Outputs(**{k: f"{v}{INCOMING}" if v else None for k, v in dataclasses.asdict(self).items()})


@dataclass(frozen=True)
class TrainSpec:
    train: Train                    # the recipe; train.processes is the number of ranks
    dataset: str                    # the dataset's name under <lake>/datasets/
    urls: dict[str, str]            # split -> the split's Petastorm URL
    rows: dict[str, int]            # split -> rows
    labels: list[str] | None        # class names; None when the target is the topic vector
    outputs: int                    # the head's width: classes, or the topic vector's length
    preprocessing: dict             # size, crop, mean, std (the weights' normalisation), note
    card: dict                      # the starting weights' card (dl.weights.Card)
    checkpoints: str                # this run's checkpoint folder
    runs: str                       # the folder of every run's checkpoint folder
    final: Outputs                  # where the outputs are published once the run completes
    staged: Outputs                 # where the run writes them until then
    table_schema: pa.Schema | None  # the Arrow schema of final.table's rows
    endpoint: str | None = None     # S3 endpoint and region (s3.* of the profile)
    region: str | None = None
    resume: bool = False            # continue from the newest checkpoint under `checkpoints`
    gpu: bool = False
    threads: int | None = None      # torch threads per process (None: cores / processes)

    @property
    def io(self) -> dict:
        """The storage keywords of every read and write (core.storage, dl.checkpoint, dl.data)."""
        return {"endpoint": self.endpoint, "region": self.region}

    def to_json(self) -> str:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["train"] = self.train.model_dump()
        body["final"], body["staged"] = dataclasses.asdict(self.final), dataclasses.asdict(self.staged)
        if self.table_schema is not None:
            body["table_schema"] = base64.b64encode(self.table_schema.serialize().to_pybytes()).decode()
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        body = json.loads(text)
        body["train"] = Train.model_validate(body["train"])
        body["final"], body["staged"] = Outputs(**body["final"]), Outputs(**body["staged"])
        if body.get("table_schema"):
            body["table_schema"] = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["table_schema"])))
        return cls(**body)
