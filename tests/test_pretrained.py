"""The learning side learns, with real ImageNet weights, through the jobs a user runs: the 396
photos of ../shared/data/photos laid out as class folders (ants/, bees/; test/ holding every
third) go through ingest (source.layout=classes), prepare_images, dedup and build_dataset; the
shipped MobileNetV2's features separate the classes under train_svm, a head fine-tuned on its
frozen backbone by train_cnn classifies the held-out photos, and jobs/score.py on the held-out
folder agrees with the training job's own test figure. Random init, the same recipe, stays
near chance (the figures of both: bench/pretrained.py, docs/results.md)."""

import json
import shutil

import pytest

from core.lake import Lake, read_summary
from tests.conftest import rejects_by_reason, run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labelled(spark, photos, tmp_path_factory):
    """The photos as <split>/<class>/<name>.jpg (sorted, every third test, every tenth of the rest
    val), plus a stray file and a file one level too deep; ingested, prepared and deduplicated,
    and a dataset built from them."""
    root = tmp_path_factory.mktemp("labelled") / "photos"
    truth = {}
    for i, p in enumerate(photos):
        cls = "ants" if p.name.startswith("ants") else "bees"
        split = "test" if i % 3 == 2 else ("val" if i % 10 == 0 else "train")
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / split / cls / p.name)
        truth[f"{cls}/{p.stem}"] = (split, cls)
    (root / "train" / "README.txt").write_text("not an image")
    (root / "train" / "ants" / "deeper").mkdir()
    shutil.copy(photos[0], root / "train" / "ants" / "deeper" / "x.jpg")
    lake = root.parent / "lake"
    args = ["--set", f"lake={lake}", "--set", "source.layout=classes", "--set", f"source.path={root}"]
    for job in ("ingest", "prepare_images", "dedup"):
        assert run_job(job, *args) == 0, job
    assert run_job("build_dataset", *args, "--set", "dataset.name=photos", "--set", "dataset.ranks=2") == 0
    return lake, root, truth


@pytest.mark.slow
def test_a_labelled_folder_is_ingested_with_its_classes_and_splits(spark, labelled):
    lake, _, truth = labelled
    posts = spark.read.parquet(str(lake / "tables" / "posts")).select("post_id", "city", "split").toPandas()
    assert {p: (s, c) for p, c, s in zip(posts.post_id, posts.city, posts.split)} == truth
    rejected = rejects_by_reason(spark, Lake(str(lake)), "ingest")
    assert set(rejected) == {"unrecognized_file"}
    s = read_summary(spark, str(lake / "tables" / "posts"))
    assert s["balanced"] and s["input_rows"] == len(truth) + 2 and s["output_rows"] == len(truth)
    built = read_summary(spark, str(lake / "datasets" / "photos"))
    assert json.loads((lake / "datasets" / "photos" / "labels.json").read_text()) == ["ants", "bees"]
    want = {split: sum(1 for s, _ in truth.values() if s == split) for split in ("train", "val", "test")}
    assert built["splits"] == want  # the folders' split, kept


@pytest.mark.slow
def test_the_shipped_weights_features_separate_the_classes_under_train_svm(spark, labelled):
    lake, _, truth = labelled
    args = ["--set", f"lake={lake}", "--set", "features.dataset=photos"]
    assert run_job("extract_features", *args) == 0
    assert run_job("train_svm", *args, "--set", "svm.baselines=[sklearn_linearsvc]") == 0
    report = json.loads((lake / "reports" / "likability_svm" / "metrics.json").read_text())
    got = {(r["algorithm"], r["variant"]): r["test_ap"] for r in report["results"]}
    assert report["test_positive_rate"]["prelogit"] == pytest.approx(
        sum(1 for s, c in truth.values() if s == "test" and c == "bees") / sum(1 for s, _ in truth.values() if s == "test"))
    for variant in ("normal", "flipped+normal"):
        assert got[("spark_linearsvc", variant)] >= 0.97, got
        assert got[("sklearn_linearsvc", variant)] >= 0.97, got


def test_features_of_any_images_table(spark, labelled):
    """features.images: the vectors of every prepared image, split and label null."""
    lake, _, truth = labelled
    assert run_job("extract_features", "--set", f"lake={lake}", "--set", "features.images=images",
                   "--set", "features.mirror=false") == 0
    feats = spark.read.parquet(str(lake / "tables" / "features")).toPandas()
    s = read_summary(spark, str(lake / "tables" / "features"))
    assert s["balanced"] and s["output_rows"] == len(truth) == len(feats) and s["dataset"] is None
    assert feats.split.isna().all() and feats.label.isna().all() and set(feats.layer) == {"prelogit"}
    assert {len(v) for v in feats.vector} == {1280}
    assert s["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.mark.slow
def test_a_head_fine_tuned_on_the_frozen_backbone_classifies_held_out_photos_and_score_agrees(spark, labelled):
    lake, root, truth = labelled
    args = ["--set", f"lake={lake}", "--set", "train.dataset=photos", "--set", "train.epochs=2",
            "--set", "train.processes=1", "--set", "train.mode=inline", "--set", "progress.interval=0"]
    from tests.conftest import WEIGHTS

    assert run_job("train_cnn", "--task", "city", "--preset", "city-mobilenet", *args,
                   "--set", f"train.weights={WEIGHTS['mobilenet_v2']}") == 0
    trained = json.loads((lake / "models" / "city" / "_SUMMARY.json").read_text())
    assert trained["test"]["rows"] == 132 and trained["test"]["top1"] >= 0.90, trained["test"]
    assert run_job("score", "--set", f"lake={lake}", "--set", "score.layout=classes",
                   "--set", f"score.input={root / 'test'}", "--set", "score.models=[city]") == 0
    scores = spark.read.parquet(str(lake / "tables" / "scores")).toPandas()
    assert len(scores) == 132
    right = sum(truth[p][1] == c for p, c in zip(scores.post_id, scores.city))
    assert right / len(scores) == pytest.approx(trained["test"]["top1"], abs=1 / 132 + 1e-9)
