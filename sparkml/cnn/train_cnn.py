"""The driver side of train_cnn: check the dataset, the model and the cluster before anything
starts, launch dl.train.run on every rank (TorchDistributor local or barrier mode, or inline),
and turn rank 0's result into the report and the job summary.

    <lake>/models/<task>/model.pt, model.json     the best epoch by validation (scoring loads it)
    <lake>/reports/train_<task>/metrics.{json,md}  per-epoch history, test figures beside the published
    <lake>/reports/train_<task>/curve.png, tensorboard/
    <lake>/checkpoints/train_<task>/step-*.pt      for --resume (train.checkpoint_dir)
    <lake>/tables/image_topics                     topics task: the regressed vectors of the test images
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyspark.sql import SparkSession

from core import storage
from core.config import Config, ConfigError, read_yaml
from core.lake import Lake, Summary, UnusableInput, close_output, lock_output, open_input
from core.schemas import SPLITS, TABLES
from dl.spec import Outputs, TrainSpec

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "train"

# The original's figures (InstaCities1M city classifier, top-1 on a 200K test subset, and per city;
# the likability AlexNet's test accuracy).
PUBLISHED = {
    "city": {"top1": 0.263, "per_class": dict(zip(
        ["london", "newyork", "sydney", "losangeles", "chicago", "melbourne", "miami", "toronto", "singapore",
         "sanfrancisco"], [0.297, 0.213, 0.243, 0.183, 0.214, 0.236, 0.333, 0.214, 0.416, 0.291]))},
    "likability": {"accuracy": 0.57},
    "topics": {},
}


def preset(task: str | None, name: str | None) -> dict:
    """The config sections of a preset: conf/train/<name>.yaml (default <task>.yaml) or a YAML path."""
    if task is None:
        raise ConfigError("--task is required: city, topics or likability")
    name = name or task
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS / f"{name}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"--preset {name}: no such preset ({have}, or a YAML path)")
    tree = read_yaml(path)
    tree.setdefault("train", {})["task"] = task
    return tree


def _field_width(url: str, column: str) -> int | None:
    """The first dimension of a dataset column (from its Unischema): a vector's width, the
    image's side; None when the dataset has no such column."""
    from petastorm.etl.dataset_metadata import get_schema_from_dataset_url

    field = get_schema_from_dataset_url(storage.qualify(url)).fields.get(column)
    return None if field is None else (int(field.shape[0]) if field.shape else 0)


def _gpu(spark: SparkSession, cfg: Config) -> bool:
    t = cfg.train
    if t.gpu is not None:
        return t.gpu
    if t.mode == "cluster":
        return float(spark.conf.get("spark.task.resource.gpu.amount", "0")) >= 1
    import torch

    return torch.cuda.is_available()


def _threads(spark: SparkSession, cfg: Config) -> int:
    t = cfg.train
    if t.threads:
        return t.threads
    if t.mode == "cluster":
        return int(spark.conf.get("spark.task.cpus", "1"))
    return max(1, (os.cpu_count() or 1) // (1 if t.mode == "inline" else t.processes))


def check_mode(spark: SparkSession, cfg: Config, gpu: bool) -> None:
    """Launch settings Spark or TorchDistributor would refuse later, said now in one line."""
    t = cfg.train
    if t.mode == "inline" and t.processes != 1:
        raise ConfigError("train.mode=inline runs one process, this one: set train.processes=1 (or mode local)")
    if t.mode == "cluster":
        if spark.conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
            raise ConfigError("train.mode=cluster runs a barrier stage, which Spark refuses under dynamic allocation "
                              "(on by default on EMR): submit with --conf spark.dynamicAllocation.enabled=false")
        amount = spark.conf.get("spark.task.resource.gpu.amount", "0")
        if gpu and float(amount) != int(float(amount)):
            raise ConfigError(f"spark.task.resource.gpu.amount={amount}: TorchDistributor needs a whole number of GPUs "
                              "per task (1 for training; fractional amounts are for inference)")
    if t.backend == "horovod":
        try:
            import horovod  # noqa: F401
        except ImportError:
            raise ConfigError("train.backend=horovod: horovod is not installed; build it with `make horovod` "
                              "(deploy/horovod/README.md) and pip install the wheel") from None


def _check_resume(spark: SparkSession, run_json: str, train: dict) -> None:
    from dl.recipe import RESUME_KEYS

    if not storage.exists(spark, run_json):
        return
    before = json.loads(storage.read_bytes(spark, run_json))
    differ = [k for k in RESUME_KEYS if before.get(k) != train.get(k)]
    if differ:
        said = ", ".join(f"train.{k}={before.get(k)!r} (now {train.get(k)!r})" for k in differ)
        raise ConfigError(f"--resume: the checkpoints under {storage.parent(run_json)} were made with {said}; run "
                          "with those settings, or without --resume to start over")


def spec(spark: SparkSession, cfg: Config, resume: bool) -> TrainSpec:
    """Everything a training process needs, after checking it can run."""
    from dl import data
    from dl.models import ModelError
    from dl.recipe import TASKS, TrainError, build
    from dl.weights import card, describe

    t = cfg.train
    lake = Lake(cfg.lake)
    task = TASKS[t.task]
    root = lake.dataset(t.dataset)
    built = open_input(spark, root, "run jobs/build_dataset.py"
                       + (" --set dataset.labels=likability" if t.task == "likability" else "") + " first")
    urls = {s: f"{root}/{s}" for s in SPLITS}
    for split in SPLITS:
        if not built["splits"].get(split):
            raise UnusableInput(f"{root}/{split} has no rows: rebuild the dataset with a non-zero dataset."
                                f"{'val' if split == 'val' else 'train'} share")
    labels = json.loads(storage.read_bytes(spark, f"{root}/labels.json"))
    if task.target == "topics":
        width = _field_width(urls["train"], "topics")
        if not width:
            raise UnusableInput(f"{root} has no caption topics: run jobs/train_lda.py and jobs/infer_topics.py, "
                                "then jobs/build_dataset.py")
        outputs, labels = width, None
    else:
        if t.task == "likability" and labels != ["bad", "good"]:
            raise UnusableInput(f"train.dataset={t.dataset} holds labels {labels[:4]}, not likability's bad/good: "
                                "use the likability dataset (build_dataset --set dataset.labels=likability)")
        if t.task == "city" and labels == ["bad", "good"]:
            raise UnusableInput(f"train.dataset={t.dataset} is a likability dataset: the city task needs cities")
        present = [k for k, n in (built.get("per_label") or {}).items() if n] or labels
        if len(present) < 2:
            raise UnusableInput(f"{root} holds one class only ({present}): a classifier needs at least two; rebuild "
                                "the dataset from posts of several classes")
        outputs = len(labels)
    gpu = _gpu(spark, cfg)
    check_mode(spark, cfg, gpu)
    world = 1 if t.mode == "inline" else t.processes
    try:
        data.plan(urls["train"], world, t.batch_size, cfg.s3.endpoint, cfg.s3.region)
        weights = card(t.model, t.weights, cfg.s3.endpoint, cfg.s3.region)
        build(t, outputs, cfg.s3.endpoint, cfg.s3.region)  # the model, weights and freeze list can be had
    except (data.DatasetTooSmall, ModelError, TrainError) as e:
        raise ConfigError(f"train: {e}") from None
    size = _field_width(urls["train"], "image")
    if t.crop > size:
        raise ConfigError(f"train.crop={t.crop} is larger than the dataset's {size} px images: set train.crop <= {size}")
    print(f"train_cnn: weights {t.weights}: {describe(weights)}", flush=True)
    if t.task == "city" and t.weights == "none" and t.freeze:
        print("train_cnn: note: the original's recipe (conv1-2 frozen, SGD lr 0.001) presumes ImageNet weights; from "
              "random weights it stays at chance: use --preset city-scratch", flush=True)
    train = t.model_copy(update={"processes": world})
    from dl import checkpoint

    runs_root = storage.qualify(t.checkpoint_dir or f"{lake.root}/checkpoints/train_{t.task}").rstrip("/")
    checkpoints = checkpoint.run_folder(runs_root, resume, cfg.s3.endpoint, cfg.s3.region)
    if resume:
        _check_resume(spark, f"{checkpoints}/run.json", train.model_dump())
    # the run writes beside its outputs (<output>.incoming); they replace the previous ones only once
    # it completes, so a run that fails or is stopped never costs the last good model, report or table
    topics = task.target == "topics"
    final = Outputs(export=lake.model(t.task), report=lake.report(f"train_{t.task}"),
                    table=lake.table("image_topics") if topics else None)
    return TrainSpec(
        train=train, dataset=t.dataset, urls=urls, rows={s: int(built["splits"][s]) for s in SPLITS}, labels=labels,
        outputs=outputs, card=weights.model_dump(),
        preprocessing={"size": size, "crop": t.crop, **weights.normalisation,
                       "note": "images prepared as prepare_images does (size x size), then the centre crop x crop, "
                               "normalised as the weights' card says"},
        checkpoints=checkpoints, runs=runs_root, final=final, staged=final.staged(),
        table_schema=TABLES["image_topics"].arrow if topics else None,
        endpoint=cfg.s3.endpoint, region=cfg.s3.region, resume=resume, gpu=gpu, threads=_threads(spark, cfg))


def launch(spark: SparkSession, cfg: Config, s: TrainSpec) -> dict:
    """Run dl.train.run on every rank; rank 0's result. A run the training function stops (a
    diverged loss, no checkpoint that loads) is one ConfigError line, from whichever process."""
    import re

    from dl.recipe import TrainError

    try:
        return _launch(spark, cfg, s)
    except TrainError as e:
        raise ConfigError(f"train_cnn: {e}") from None
    except Exception as e:  # noqa: BLE001 - torchrun / Horovod report a rank's TrainError in their own text
        said = re.search(r"TrainError: (.+)", str(e))
        if said is None:
            raise
        raise ConfigError(f"train_cnn: {said.group(1).strip()}") from None


def _launch(spark: SparkSession, cfg: Config, s: TrainSpec) -> dict:
    from dl.train import run

    t = cfg.train
    if t.mode == "inline":
        return run(s)
    if t.backend == "horovod":
        from dl.horovod import spark_run

        return spark_run(run, s, num_proc=s.train.processes)
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=t.processes, local_mode=t.mode == "local", use_gpu=s.gpu)
    return distributor.run(run, s)


def _outputs(s: TrainSpec) -> list[tuple[str, str]]:
    """(published, staged) of each output the run writes: report, table, then the model (last:
    its summary, written by cli.run, follows it)."""
    return [(getattr(s.final, k), getattr(s.staged, k)) for k in ("report", "table", "export") if getattr(s.final, k)]


def _begin(spark: SparkSession, s: TrainSpec) -> None:
    """Lock the outputs (a second run at once refuses) without touching them; a fresh run clears
    what an earlier failed run left in the staging folders, a resumed one continues there."""
    for final, staged in _outputs(s):
        lock_output(spark, final)
        if not s.resume:
            storage.delete(spark, staged)
    if s.resume:  # the run resumed may have completed and published: its best model carries on from there
        for name in ("model.pt", "model.json"):
            staged, final = f"{s.staged.export}/{name}", f"{s.final.export}/{name}"
            if not storage.exists(spark, staged) and storage.exists(spark, final):
                storage.write_bytes(spark, staged, storage.read_bytes(spark, final))
    storage.write_bytes(spark, f"{s.checkpoints}/run.json", json.dumps(s.train.model_dump(), indent=1).encode())


def _publish(spark: SparkSession, s: TrainSpec, cfg: Config) -> None:
    """The completed run's outputs replace the previous ones; older runs' checkpoints go."""
    from dl import checkpoint

    for final, staged in _outputs(s):
        storage.delete(spark, final)
        if storage.exists(spark, staged):
            storage.rename(spark, staged, final)
    for old in checkpoint.runs(s.runs, cfg.s3.endpoint, cfg.s3.region)[:-1]:
        if old != s.checkpoints:
            storage.delete(spark, old)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def report_md(task: str, result: dict) -> str:
    """The run's figures as Markdown: test figures beside the published ones, the history."""
    test, pub = result["test"], PUBLISHED[task]
    best = result["best"] or {}
    lines = [f"# train_cnn --task {task}", "",
             f"Best epoch by {best.get('metric')}: {best.get('epoch')} ({_fmt(best.get('value'))}); test rows "
             f"{test.get('rows')}; {result['world']} process(es) on {result['device']}.", ""]
    if task == "topics":
        lines += [f"Test loss (sigmoid cross-entropy per topic): {_fmt(test.get('loss'))}. Retrieval figures: "
                  "jobs/evaluate_retrieval.py --set retrieval.embeddings=image_topics.", ""]
    else:
        key = "top1" if task == "city" else "accuracy"
        lines += ["| | ours | published |", "|---|---|---|", f"| {key} | {_fmt(test.get(key))} | {_fmt(pub.get(key))} |"]
        if "ap" in test:
            lines.append(f"| average precision | {_fmt(test['ap'])} | |")
            lines.append(f"| positive rate (AP of chance) | {_fmt(test['positive_rate'])} | |")
        for name, acc in test["per_class"].items():
            lines.append(f"| {name} | {_fmt(acc)} | {_fmt(pub.get('per_class', {}).get(name))} |")
        names = list(test["per_class"])
        lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(map(str, row)) + " |" for n, row in zip(names, test["confusion"])]
    keys = [k for k in result["history"][0] if k != "epoch"] if result["history"] else []
    lines += ["", "| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {h['epoch']} | " + " | ".join(f"{h.get(k):.4g}" if isinstance(h.get(k), float) else str(h.get(k))
                                                for k in keys) + " |" for h in result["history"]]
    return "\n".join(lines) + "\n"


def train_cnn(spark: SparkSession, cfg: Config, resume: bool = False) -> Summary:
    s = spec(spark, cfg, resume)
    _begin(spark, s)
    result = launch(spark, cfg, s)
    task = cfg.train.task
    md = report_md(task, result)
    storage.write_bytes(spark, f"{s.staged.report}/metrics.md", md.encode())
    print(md, flush=True)
    rows = sum(s.rows.values())
    if s.staged.table:
        written = spark.read.parquet(s.staged.table).count()
        close_output(spark, Summary(stage="train_cnn", input_rows=s.rows["test"], output_rows=written,
                                    output=s.staged.table, extra={"task": task, "split": "test"}))
    _publish(spark, s, cfg)
    test = {k: v for k, v in result["test"].items() if k not in ("confusion",)}
    return Summary(stage="train_cnn", input_rows=rows, output_rows=rows, output=s.final.export, extra={
        "task": task, "dataset": s.dataset, "splits": s.rows, "model": cfg.train.model,
        "weights": cfg.train.weights, "processes": s.train.processes, "device": result["device"],
        "batches_per_epoch": result["batches_per_epoch"], "iterations": result["iterations"],
        "best": result["best"], "test": test, "history": result["history"], "resumed_from": result["resumed_from"],
        "report": s.final.report, "checkpoints": s.checkpoints})
