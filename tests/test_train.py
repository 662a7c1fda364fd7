"""dl.train + jobs/train_cnn.py: heads and frozen layers, two processes = one with twice the
batch, a SIGKILLed run resumed ends with the same weights, uneven shards, the three tasks end
to end through TorchDistributor with 2 processes, exported models the scoring side can load."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, machine_lock, module_folder, run_job

SIDE, CROP = 72, 64  # AlexNet needs 63 px at least; small images keep CPU steps short
# The tests of the loop's mechanics (processes, accumulation, shards, resume) train the smallest model
# the product ships: an AlexNet step moves 57M weights, and its checkpoint (Adam's two moments beside
# them) is 0.7 GB; SqueezeNet 1.1's 1.2M run the same assertions (test_two_accumulated_batches: 12.5
# -> 1.9 s). AlexNet's presets keep their own tests: heads and freezing, likability end to end, scoring.
MECHANICS = "squeezenet1_1"
TOPICS = 6


def _write_dataset(spark, lake: Path, name: str, kind: str, groups: dict[str, list[int]], classes: list[str]):
    """A Petastorm dataset <lake>/datasets/<name> in build_dataset's layout (the same Unischemas,
    labels.json, _SUMMARY.json) with exactly the given row-group sizes per split. Images are
    the class's colour plus noise, so the classes can be told apart."""
    from petastorm.etl.dataset_metadata import materialize_dataset
    from petastorm.unischema import dict_to_spark_row

    from core.lake import Summary, write_summary
    from sparkml.cnn.build_dataset import cities_schema, likability_schema

    schema = cities_schema(SIDE, TOPICS) if kind == "cities" else likability_schema(SIDE)
    rng = np.random.default_rng(5)
    colours = rng.integers(0, 256, (len(classes), 3))
    root = lake / "datasets" / name
    counts, n = {}, 0
    for split, sizes in groups.items():
        rows = []
        for size in sizes:
            for _ in range(size):
                label = n % len(classes)
                image = np.clip(colours[label] + rng.normal(0, 40, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
                row = {"post_id": f"{split}{n:05d}", "image": image, "label": np.int32(label)}
                if kind == "cities":
                    topics = np.full(TOPICS, 0.02, np.float32)
                    topics[label % TOPICS] = 1 - 0.02 * (TOPICS - 1)
                    row.update(city=classes[label], topics=None if n % 7 == 3 else topics)
                else:
                    row["ratio"] = float(label)
                rows.append(dict_to_spark_row(schema, row))
                n += 1
        url = f"file://{root}/{split}"
        # one partition (one file, one row group) per group, in order
        slices = [rows[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
        rdd = spark.sparkContext.parallelize(slices, len(slices)).flatMap(lambda s: s)
        with materialize_dataset(spark, url, schema, 64):
            spark.createDataFrame(rdd, schema.as_spark_schema()).write.mode("overwrite").parquet(url)
        counts[split] = sum(sizes)
    (root / "labels.json").write_text(json.dumps(classes))
    per_label = {c: sum(1 for i in range(n) if i % len(classes) == k) for k, c in enumerate(classes)}
    write_summary(spark, Summary(stage="build_dataset", input_rows=n, output_rows=n, output=str(root),
                                 extra={"splits": counts, "labels": classes, "per_label": per_label}))
    return root


@pytest.fixture(scope="module")
def tiny(spark, request, tmp_path_factory):
    with module_folder(request, tmp_path_factory, "lake_train") as lake:
        cities = [f"city{i}" for i in range(4)]
        _write_dataset(spark, lake, "even", "cities", {"train": [8, 8], "val": [8], "test": [8]}, cities)
        _write_dataset(spark, lake, "uneven", "cities", {"train": [12, 5, 9], "val": [6, 5], "test": [7]}, cities)
        _write_dataset(spark, lake, "long", "cities", {"train": [16, 16], "val": [8], "test": [8]}, cities)
        _write_dataset(spark, lake, "selfies", "likability", {"train": [10, 10], "val": [8], "test": [12]},
                       ["bad", "good"])
        yield lake


def _sets(lake, **train) -> list[str]:
    base = {"crop": CROP, "epochs": 1, "log_every": 1, "threads": 1}
    out = ["--set", f"lake={lake}"]
    for k, v in {**base, **train}.items():
        out += ["--set", f"train.{k}={json.dumps(v) if isinstance(v, list) else v}"]
    return out


def _sets_dict(lake, **train) -> list[str]:
    """_sets as load_config overrides (key=value, no --set)."""
    args = _sets(lake, **train)
    return [a for a in args if a != "--set"]


def _final(lake, task: str) -> dict:
    from dl import checkpoint

    return checkpoint.load(checkpoint.latest(checkpoint.runs(f"{lake}/checkpoints/train_{task}")[-1]))


def _summary(lake, task: str) -> dict:
    return json.loads((Path(lake) / "models" / task / "_SUMMARY.json").read_text())


def test_heads_have_the_task_shapes_and_presets_freeze_what_the_original_froze():
    from core.config import load_config
    from dl.recipe import build
    from sparkml.cnn.train_cnn import preset

    for task, name, outputs, frozen in (("city", "city", 10, ["features.0", "features.3"]),
                                        ("likability", "likability", 2, []),
                                        ("topics", "topics", 500, ["conv1", "inception4d"])):
        cfg = load_config(ROOT / "conf" / "local.yaml", ["train.weights=none"], preset(task, name))
        model, names = build(cfg.train, outputs)
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, outputs)
        assert all(f in names for f in frozen)
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        if task == "city":  # conv1, conv2 fixed; conv3-5 and the classifier trained
            assert [n for n, p in model.features.named_parameters() if p.requires_grad] == [
                "6.weight", "6.bias", "8.weight", "8.bias", "10.weight", "10.bias"]
            assert model.classifier[-1].out_features == 10
        if task == "topics":  # no auxiliary heads; everything up to inception_4d fixed
            assert model.aux1 is None and model.aux2 is None
            assert trainable == {"inception4e", "inception5a", "inception5b", "fc"}
        if task == "likability":
            assert trainable == {"features", "classifier"}


def test_a_freeze_list_naming_no_module_exits_2(tiny, capsys):
    rc = run_job("train_cnn", "--task", "city", "--preset", "city-scratch",
                 *_sets(tiny, dataset="even", freeze=["features.99"], mode="inline", processes=1, batch_size=8))
    assert rc == 2
    assert "train.freeze: alexnet has no module 'features.99'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.lane35
def test_two_processes_with_batch_b_take_the_same_step_as_one_with_2b_and_frozen_layers_stay(tiny):
    """DDP under TorchDistributor and Horovod under horovod.spark.run, 2 processes x batch 8,
    against one inline process accumulating 2 batches of 8 over the same 16 images (the same
    step as one batch of 16: test_two_accumulated_batches_of_b_take_the_same_step_as_one_batch_of_2b).
    Batches of the same size on both sides: on some CPUs (this one's Intel Xeon) float32 kernels
    for a batch of 16 and of 8 round differently by up to 0.7% of the step, which says nothing
    about the averaging this test is about."""
    from dl.models import load_model

    # one plain SGD step, large enough to stand well above float32 rounding of the weights
    common = dict(dataset="even", model=MECHANICS, optimizer="sgd", lr=1.0, momentum=0.0, dropout=0.0, weights="none",
                  freeze=["features.0", "features.3"], checkpoint_every=0)
    assert run_job("train_cnn", "--task", "city", *_sets(tiny, batch_size=8, processes=2, **common)) == 0
    two = _final(tiny, "city")["model"]
    s = _summary(tiny, "city")
    assert s["processes"] == 2 and s["batches_per_epoch"] == 1 and s["iterations"] == 1
    assert run_job("train_cnn", "--task", "city",
                   *_sets(tiny, batch_size=8, accumulate=2, processes=1, mode="inline", **common)) == 0
    one = _final(tiny, "city")["model"]
    assert run_job("train_cnn", "--task", "city",
                   *_sets(tiny, batch_size=8, processes=2, backend="horovod", **common)) == 0
    hvd = _final(tiny, "city")["model"]
    assert _summary(tiny, "city")["processes"] == 2
    start = load_model(MECHANICS, "none", num_classes=4, seed=0).state_dict()
    for name, w in start.items():
        if name.startswith(("features.0.", "features.3.")):
            assert all(torch.equal(m[name], w) for m in (one, two, hvd)), name  # frozen: untouched
        else:
            step = (one[name] - w).abs().max()
            assert step > 0, name
            assert (two[name] - one[name]).abs().max() <= 1e-3 * step + 1e-8, name
            assert (hvd[name] - one[name]).abs().max() <= 1e-3 * step + 1e-8, name


@pytest.mark.slow
def test_two_accumulated_batches_of_b_take_the_same_step_as_one_batch_of_2b(tiny):
    from dl.models import load_model

    common = dict(dataset="even", model=MECHANICS, optimizer="sgd", lr=1.0, momentum=0.0, dropout=0.0,
                  weights="none", freeze=[], checkpoint_every=0, mode="inline", processes=1)
    assert run_job("train_cnn", "--task", "city", *_sets(tiny, batch_size=8, **common)) == 0
    whole = _final(tiny, "city")["model"]
    assert run_job("train_cnn", "--task", "city", *_sets(tiny, batch_size=4, accumulate=2, **common)) == 0
    s = _summary(tiny, "city")
    assert s["batches_per_epoch"] == 4 and s["iterations"] == 2  # 16 rows: 4 batches of 4, 2 steps
    parts = _final(tiny, "city")["model"]
    start = load_model(MECHANICS, "none", num_classes=4, seed=0).state_dict()
    for name, w in start.items():
        moved = (whole[name] - w).abs().max()
        assert moved > 0, name
        assert (parts[name] - whole[name]).abs().max() <= 1e-3 * moved + 1e-8, name


@pytest.mark.slow
@pytest.mark.lane35
def test_uneven_shards_run_the_same_number_of_batches_on_every_rank_in_barrier_mode(tiny):
    # train row groups 12, 5, 9 over 2 ranks: rank 0 holds 12 + 9 rows, rank 1 holds 5. The
    # ranks run as Spark barrier tasks (train.mode=cluster, TorchDistributor local_mode=False).
    # Spark's barrier mode picks the rendezvous port by binding port 0 and closing it; torchrun
    # binds it seconds later: two such runs side by side (this test on both stacks) once took each
    # other's port (EADDRINUSE), so one runs at a time.
    with machine_lock("barrier-training"):
        assert run_job("train_cnn", "--task", "city", "--preset", "city-scratch",
                       *_sets(tiny, dataset="uneven", model=MECHANICS, batch_size=2, processes=2, epochs=2,
                              checkpoint_every=0, mode="cluster")) == 0
    s = _summary(tiny, "city")
    assert s["batches_per_epoch"] == 2 and s["iterations"] == 4 and len(s["history"]) == 2
    assert s["test"]["rows"] == 7 and s["splits"] == {"train": 26, "val": 11, "test": 7}


def _descendants_killed(proc: subprocess.Popen) -> int:
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.kill()  # SIGKILL
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    return len(procs)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tiny, tmp_path):
    from dl import checkpoint

    args = ["--task", "city", "--preset", "city-scratch",
            *_sets(tiny, dataset="long", model=MECHANICS, batch_size=4, processes=2, epochs=3,
                   checkpoint_every=1, keep_checkpoints=50)]
    assert run_job("train_cnn", *args) == 0
    want = _final(tiny, "city")
    exported = checkpoint.load(f"{tiny}/models/city/model.pt")["model"]
    assert want["position"]["epoch"] == 3 and want["position"]["iteration"] == 12  # 4 batches x 3 epochs

    root = f"{tiny}/checkpoints/train_city"
    shutil.rmtree(root)  # what the poll below sees comes from the run it kills
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_cnn.py"), "--config",
                             str(ROOT / "conf" / "local.yaml"), *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = checkpoint.runs(root)
        found = checkpoint.latest(runs[-1]) if runs else None
        if found and int(found[-12:-3]) >= 5:  # iteration 5: epoch 2, batch 1 of 4
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert _descendants_killed(proc) >= 3  # the job, torchrun's agent and its two training processes
    at = checkpoint.load(checkpoint.latest(checkpoint.runs(root)[-1]))["position"]
    assert 0 < at["batch"] < 4 and at["epoch"] == 1, at  # mid-epoch
    # the killed run wrote beside the previous model: that one is still there, whole and complete
    assert (tiny / "models" / "city" / "_SUMMARY.json").exists()
    assert all(torch.equal(checkpoint.load(f"{tiny}/models/city/model.pt")["model"][n], w) for n, w in exported.items())

    assert run_job("train_cnn", *args, "--resume") == 0
    s = _summary(tiny, "city")
    assert s["resumed_from"].endswith(checkpoint.name(at["iteration"]))
    got = _final(tiny, "city")
    assert got["position"]["iteration"] == 12
    for name, w in want["model"].items():
        assert torch.equal(got["model"][name], w), name  # bit-identical on CPU
    for name, w in exported.items():
        assert torch.equal(checkpoint.load(f"{tiny}/models/city/model.pt")["model"][name], w), name
    assert [h["train_loss"] for h in s["history"]] == [h["train_loss"] for h in want["position"]["history"]]


def test_resume_refuses_checkpoints_made_with_other_settings(tiny, capsys):
    args = ["--task", "city", "--preset", "city-scratch"]
    assert run_job("train_cnn", *args, *_sets(tiny, dataset="even", model=MECHANICS, batch_size=8, processes=1,
                                              mode="inline", checkpoint_every=0)) == 0
    rc = run_job("train_cnn", *args, *_sets(tiny, dataset="even", model=MECHANICS, batch_size=4, processes=1,
                                            mode="inline"), "--resume")
    assert rc == 2
    assert "train.batch_size=8 (now 4)" in capsys.readouterr().err


@pytest.mark.slow
def test_likability_and_topics_train_with_two_processes_and_export_loadable_models(tiny, spark):
    from dl.models import load_model

    assert run_job("train_cnn", "--task", "likability", "--preset", "likability-scratch",
                   *_sets(tiny, dataset="selfies", batch_size=4, processes=2, epochs=2)) == 0
    s = _summary(tiny, "likability")
    assert s["test"]["rows"] == 12 and 0 <= s["test"]["ap"] <= 1 and s["test"]["positive_rate"] == 0.5
    meta = json.loads((tiny / "models" / "likability" / "model.json").read_text())
    assert meta["labels"] == ["bad", "good"] and meta["preprocessing"]["size"] == SIDE
    model = load_model(meta["model"], str(tiny / "models" / "likability" / "model.pt"), num_classes=meta["outputs"])
    assert model(torch.zeros(1, 3, CROP, CROP)).shape == (1, 2)
    report = tiny / "reports" / "train_likability"
    assert (report / "curve.png").read_bytes()[:4] == b"\x89PNG" and list((report / "tensorboard").iterdir())
    assert "| accuracy |" in (report / "metrics.md").read_text()

    assert run_job("train_cnn", "--task", "topics", "--preset", "topics-scratch",
                   *_sets(tiny, dataset="even", batch_size=4, processes=2)) == 0
    s = _summary(tiny, "topics")
    assert s["best"]["metric"] == "val_loss" and s["test"]["loss"] > 0
    vectors = spark.read.parquet(str(tiny / "tables" / "image_topics")).toPandas()
    assert len(vectors) == 8 and set(vectors.split) == {"test"}
    assert all(len(v) == TOPICS and 0 < min(v) and max(v) < 1 for v in vectors.topics)
    table = json.loads((tiny / "tables" / "image_topics" / "_SUMMARY.json").read_text())
    assert table["output_rows"] == 8 and table["balanced"]
    meta = json.loads((tiny / "models" / "topics" / "model.json").read_text())
    model = load_model("googlenet", str(tiny / "models" / "topics" / "model.pt"), num_classes=TOPICS)
    assert model(torch.zeros(1, 3, CROP, CROP)).shape == (1, TOPICS)

    # jobs/score.py on the test images gives what the training job's own evaluation gave:
    # the same topic vectors it wrote to image_topics, the same likability test accuracy
    score = ["--set", f"lake={tiny}", "--set", f"prepare.size={SIDE}", "--set", "score.layout=images"]
    assert run_job("score", *score, "--set", f"score.input={tiny / 'datasets' / 'even' / 'test'}",
                   "--set", "score.models=[topics]") == 0
    scored = spark.read.parquet(str(tiny / "tables" / "scores")).toPandas().set_index("post_id")
    assert set(scored.model) == {"topics"} and set(scored.index) == set(vectors.post_id)
    for pid, v in zip(vectors.post_id, vectors.topics):
        np.testing.assert_allclose(scored.topics[pid], v, atol=1e-5)
    assert run_job("score", *score, "--set", f"score.input={tiny / 'datasets' / 'selfies' / 'test'}",
                   "--set", "score.models=[likability,likability_svm]") == 0
    scored = spark.read.parquet(str(tiny / "tables" / "scores")).toPandas()
    labels = spark.read.parquet(str(tiny / "datasets" / "selfies" / "test")).toPandas().set_index("post_id").label
    assert len(scored) == 12 and set(scored.model) == {"likability"}
    good = scored.likability_prob > 0.5
    assert np.array_equal(good, scored.likability_score > 0)
    accuracy = float(np.mean(good.to_numpy() == (labels[scored.post_id].to_numpy() == 1)))
    assert accuracy == pytest.approx(_summary(tiny, "likability")["test"]["accuracy"])
    summary = json.loads((tiny / "tables" / "scores" / "_SUMMARY.json").read_text())
    assert summary["balanced"] and summary["output_rows"] == 12 and summary["images_per_s"] > 0
    assert "jobs/train_svm.py" in summary["missing_models"]["likability_svm"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_staged_imagenet_checkpoint_fine_tunes_to_k_classes_and_its_card_travels_to_scoring(
        tiny, spark, weights, where, moto_endpoint, tmp_path):
    """The shipped MobileNetV2 (1000-class head, batch norm folded into its convolutions), staged on
    a local disk or on S3, fine-tunes to the tiny dataset's 4 classes with the city-mobilenet recipe:
    the exported network is the file's but for a new 4-way head (backbone and batch norm frozen,
    running statistics included); model.json carries the weights' card (x/127.5 - 1, the class
    names) and scoring feeds the network crops normalised that way, not with ImageNet's mean/std."""
    import boto3

    from dl import data
    from dl.models import load_model
    from dl.score import predict, read_exported
    from dl.weights import stage

    uri, sets = weights["mobilenet_v2"], []
    if where == "s3":
        boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="finetune")
        uri, _ = stage(uri, "s3://finetune/weights", name="mobilenet_v2", endpoint=moto_endpoint)
        sets = ["--set", f"s3.endpoint={moto_endpoint}", "--set", "s3.path_style_access=true"]
    lake = tmp_path / "lake"
    shutil.copytree(tiny / "datasets" / "even", lake / "datasets" / "even")
    args = ["--task", "city", "--preset", "city-mobilenet", *sets,
            *_sets(lake, dataset="even", weights=uri, mode="inline", processes=1, batch_size=8, epochs=3, lr=0.01)]
    assert run_job("train_cnn", *args) == 0
    root = lake / "models" / "city"
    meta = json.loads((root / "model.json").read_text())
    cities = json.loads((lake / "datasets" / "even" / "labels.json").read_text())
    assert meta["preprocessing"]["mean"] == meta["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    card = meta["card"]
    assert (card["mean"], card["std"], card["batchnorm"], card["categories"]) == (
        [0.5] * 3, [0.5] * 3, "folded", cities)
    assert card["sha256"] == hashlib.sha256((root / "model.pt").read_bytes()).hexdigest()
    exported = torch.load(root / "model.pt", weights_only=True)["model"]
    shipped = torch.load(weights["mobilenet_v2"].removeprefix("file://"), weights_only=True)
    assert set(exported) == set(shipped) and exported["classifier.1.weight"].shape == (4, 1280)
    for k, v in shipped.items():
        if not k.startswith("classifier.1."):
            assert torch.equal(exported[k], v), k  # running_mean / running_var too: batch norm stayed frozen
    assert _summary(lake, "city")["test"]["top1"] >= 0.75  # 4 colours: chance is 0.25

    m = read_exported(str(root))
    net = load_model("mobilenet_v2", str(root / "model.pt"), num_classes=4)
    images = [row["image"] for row in data.rows(f"{lake}/datasets/even/test", 0, 1, 0, 0, ["post_id", "image"], False)]
    crops = np.stack([data.crop_image(im, CROP, None) for im in images])
    with torch.inference_mode():
        want = net(data.normalise(crops, (0.5,) * 3, (0.5,) * 3)).numpy()
        imagenet = net(data.normalise(crops)).numpy()
    got = predict(np.stack(images), m)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - imagenet).max() > 0.1

    # a crop larger than the images is refused before anything is touched
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    assert run_job("train_cnn", *args, "--set", f"train.crop={SIDE + 1}") == 2
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_cluster_mode_under_dynamic_allocation_exits_2_before_training(tiny):
    # a fresh driver (the test session's static Spark settings cannot change): barrier stages
    # are refused under dynamic allocation, so the job says so before anything starts
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_cnn.py"), "--config",
                          str(ROOT / "conf" / "local.yaml"), "--task", "city", "--preset", "city-scratch",
                          *_sets(tiny, dataset="even", batch_size=4, mode="cluster"),
                          "--set", "spark.dynamicAllocation.enabled=true",
                          "--set", "spark.dynamicAllocation.shuffleTracking.enabled=true"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.mode=cluster runs a barrier stage, which Spark refuses under dynamic allocation" in out.stderr


@pytest.mark.slow
def test_the_training_function_runs_under_plain_torchrun_without_spark(tiny, spark, tmp_path):
    """A GPU node without Spark: the driver's spec as JSON, `torchrun -m dl.train spec.json`."""
    from core.config import load_config
    from dl.spec import Outputs
    from sparkml.cnn.train_cnn import preset, spec

    cfg = load_config(ROOT / "conf" / "local.yaml",
                      _sets_dict(tiny, dataset="even", model=MECHANICS, batch_size=4, epochs=1),
                      preset("city", "city-scratch"))
    path = tmp_path / "spec.json"
    s = dataclasses.replace(spec(spark, cfg, False), checkpoints=str(tmp_path / "ck"),
                            staged=Outputs(export=str(tmp_path / "model"), report=str(tmp_path / "report")))
    path.write_text(s.to_json())
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "dl.train", str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["rows"] == 8  # rank 0 prints the test figures
    assert (tmp_path / "model" / "model.pt").exists() and list((tmp_path / "ck").glob("step-*.pt"))
