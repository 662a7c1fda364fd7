"""The pipeline's stages, in order, defined once: `make demo` runs the demo list with local
spark-submit, deploy/emr/launch.py turns the cluster list into EMR steps (or EMR Serverless job
runs) and deploy/dataproc/submit.py into Dataproc jobs (or Serverless batches), so the three
never drift. tests/test_deploy.py fails when a job in jobs/ is in neither list.

    python -m sparkml.pipeline demo --config conf/local.yaml     # what `make demo` runs
    python -m sparkml.pipeline list                              # the stages, one line each
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO, CLUSTER = "demo", "cluster"
# What a stage needs from a cluster: plain executors, GPUs shared by inference tasks, or one GPU
# per training process in a barrier stage (no dynamic allocation).
CPU, GPU_INFER, TRAIN = "cpu", "gpu-infer", "train"


@dataclass(frozen=True)
class Stage:
    name: str                        # unique: the step / job name on the clusters
    job: str                         # jobs/<job>.py
    args: tuple[str, ...] = ()       # job options (--set key=value, --task, --preset, --query ...)
    targets: frozenset = frozenset({DEMO, CLUSTER})
    needs: str = CPU                 # CPU, GPU_INFER or TRAIN
    spark: bool = True               # False: plain Python (the sample generator)
    files: tuple[str, ...] = ()      # repository files the job reads by path (training presets)
    note: str = ""                   # printed before the stage in the demo

    @property
    def path(self) -> str:
        return f"jobs/{self.job}.py"

    @property
    def torch(self) -> bool:
        """Whether the stage imports torch (the data bundle leaves it out)."""
        return self.job in TORCH_JOBS


TORCH_JOBS = frozenset({"stage_weights", "extract_features", "train_cnn", "score", "explore"})
_ARCHIVE = ("--set", "lake=./data/archive")
# The demo's real ImageNet weights (jobs/stage_weights.py stages them; conf/local.yaml reads them too).
DEMO_WEIGHTS = "./data/weights/mobilenet_v2.pth"
_DEMO = frozenset({DEMO})
_CLUSTER = frozenset({CLUSTER})

STAGES: tuple[Stage, ...] = (
    Stage("make_sample", "make_sample", targets=_DEMO, spark=False),
    Stage("stage_weights", "stage_weights", ("--model", "mobilenet_v2", "--to", DEMO_WEIGHTS.rsplit("/", 1)[0]),
          targets=_DEMO, spark=False),
    Stage("ingest", "ingest"),
    Stage("prepare_images", "prepare_images"),
    Stage("dedup", "dedup"),
    Stage("train_lda", "train_lda"),
    Stage("infer_topics", "infer_topics"),
    Stage("build_dataset", "build_dataset"),
    Stage("filter_followers", "filter_followers"),
    Stage("detect_faces", "detect_faces",
          note="The sample's '#me' selfies carry real faces; its quote images and city scenes do not pass the face filter."),
    Stage("build_dataset_likability", "build_dataset", ("--set", "dataset.labels=likability")),
    Stage("extract_features", "extract_features", needs=GPU_INFER,
          note="MobileNetV2 features (pooled, before its ImageNet head) of the likability images, from the staged "
               "ImageNet weights (conf/emr.yaml and conf/dataproc.yaml keep the original AlexNet fc6/fc7 on clusters)."),
    Stage("train_svm", "train_svm",
          note="Likability SVMs on those features; the planted like-ratio signal puts AP above the test split's "
               "positive rate."),
    Stage("evaluate_retrieval", "evaluate_retrieval"),
    Stage("retrieve", "retrieve", ("--query", "skyline night", "--k", "20"), targets=_DEMO),
    Stage("train_cnn_city_mobilenet", "train_cnn", ("--task", "city", "--preset", "city-mobilenet",
                                                    "--set", f"train.weights={DEMO_WEIGHTS}"), targets=_DEMO,
          needs=TRAIN, note="City classifier fine-tuned from the staged ImageNet MobileNetV2, 2 processes under "
                            "TorchDistributor (--preset city-mobilenet: backbone and batch norm frozen, a new 10-way "
                            "head trained with Adam; the original's AlexNet recipe is conf/train/city.yaml). Chance "
                            "is 10%."),
    Stage("train_cnn_city", "train_cnn", ("--task", "city", "--preset", "conf/train/city.yaml"), targets=_CLUSTER,
          needs=TRAIN, files=("conf/train/city.yaml",)),
    Stage("train_cnn_likability", "train_cnn", ("--task", "likability", "--preset", "conf/train/likability.yaml"),
          targets=_CLUSTER, needs=TRAIN, files=("conf/train/likability.yaml",)),
    Stage("score_demo", "score", ("--set", "score.input=./data/sample/new_images"), targets=_DEMO, needs=GPU_INFER,
          note="Score a folder of new images (one of them truncated) with the models this run trained (city CNN, SVM)."),
    Stage("score", "score", targets=_CLUSTER, needs=GPU_INFER),
    Stage("archive_ingest", "ingest", (*_ARCHIVE, "--set", "source.layout=instagram",
                                       "--set", "source.path=./data/sample/instagram_export"), targets=_DEMO,
          note="A personal archive: an Instagram export (JSON) ingested into its own lake, explored with the "
               "MobileNetV2 features, its clusters named by the ImageNet classes the network predicts."),
    Stage("archive_prepare_images", "prepare_images", _ARCHIVE, targets=_DEMO),
    Stage("explore", "explore", ("--set", "explore.images=./data/archive/tables/images"), targets=_DEMO,
          needs=GPU_INFER),
    Stage("report", "report"),
)


def stages(target: str, only: list[str] | None = None) -> list[Stage]:
    """The target's stages in order; `only` picks some of them by name (unknown names: ValueError)."""
    mine = [s for s in STAGES if target in s.targets]
    if not only:
        return mine
    names = {s.name for s in mine}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"no stage {', '.join(unknown)} in the {target} pipeline (stages: {', '.join(s.name for s in mine)})")
    return [s for s in mine if s.name in only]


def submit_command(stage: Stage, config: str, submit: list[str]) -> list[str]:
    """The local command line of a stage: spark-submit (with `submit` options) or plain Python."""
    head = submit if stage.spark else [sys.executable]
    return [*head, stage.path, "--config", config, *stage.args]


def run_demo(config: str, submit: list[str], only: list[str] | None = None) -> int:
    """Run the demo stages in order; stop at the first that fails (its exit code)."""
    for stage in stages(DEMO, only):
        if stage.note:
            print(stage.note, flush=True)
        rc = subprocess.run(submit_command(stage, config, submit), cwd=ROOT).returncode
        if rc:
            print(f"pipeline: stage {stage.name} ({stage.path}) failed with exit code {rc}; the stages after it "
                  f"did not run", file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparkml.pipeline", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo stages with local spark-submit")
    demo.add_argument("--config", default="conf/local.yaml")
    demo.add_argument("--only", action="append", help="run only this stage (repeatable)")
    demo.add_argument("--submit", default=os.environ.get(
        "SUBMIT", "spark-submit --driver-memory 6g --driver-java-options -XX:+ExitOnOutOfMemoryError --master local[*,4]"),
                      help="the spark-submit command and its options (default: $SUBMIT or the Makefile's)")
    ls = sub.add_parser("list", help="print the stages")
    ls.add_argument("--target", choices=[DEMO, CLUSTER], default=CLUSTER)
    args = ap.parse_args(argv)
    try:
        if args.command == "list":
            for s in stages(args.target):
                print(f"{s.name:<26} {s.path:<28} {s.needs:<9} {' '.join(s.args)}")
            return 0
        return run_demo(args.config, shlex.split(args.submit), args.only)
    except ValueError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
