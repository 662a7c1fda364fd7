"""The learning and output side under failures and bad inputs (issue 29): a run that fails or is
refused leaves the previous complete output as it was, NaN never looks like a result, archives
never reach outside their folder, models and checkpoints that do not fit are one clear line, the
deploy launchers validate what they are given and print no secret. One test per defect, named
by its number in the issue."""

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.lake import Lake, Summary, read_summary, write_summary
from tests.conftest import ROOT, make_export, rejects_by_reason, run_job
from tests.test_train import SIDE, _sets, _write_dataset

CITIES = ["c0", "c1", "c2", "c3"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes): what a refused run must leave alone."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    """A lake with a tiny 4-class dataset and a city model trained on it (inline, squeezenet 1.1)."""
    lake = tmp_path_factory.mktemp("failures") / "lake"
    _write_dataset(spark, lake, "cities", "cities", {"train": [8, 8], "val": [8], "test": [8]}, CITIES)
    args = ["--task", "city", "--preset", "city-scratch",
            *_sets(lake, dataset="cities", model="squeezenet1_1", batch_size=8, processes=1, mode="inline",
                   checkpoint_every=1)]
    assert run_job("train_cnn", *args) == 0
    return lake, args


def test_01_05_a_refused_or_diverging_training_run_leaves_the_previous_model_and_checkpoints(spark, trained, capsys):
    lake, args = trained
    before = {d: _files(lake / d) for d in ("models", "checkpoints", "reports")}
    capsys.readouterr()
    # 1: a crop larger than the dataset's images, refused before anything is touched
    assert run_job("train_cnn", *args, "--set", f"train.crop={SIDE + 1}") == 2
    assert f"train.crop={SIDE + 1} is larger than the dataset's {SIDE} px images" in _one_line(capsys)
    # 5: a learning rate that makes the loss NaN stops the run; nothing of it is exported
    assert run_job("train_cnn", *args, "--set", "train.lr=1e12", "--set", "train.optimizer=sgd") == 2
    said = _one_line(capsys)
    assert "training diverged" in said and "lower train.lr" in said, said
    with pytest.raises(SystemExit) as exited:  # refused while the options are parsed
        run_job("train_cnn", *args, "--set", "train.lr=.inf")
    assert exited.value.code == 2 and "config key 'train.lr': Input should be a finite number" in _one_line(capsys)
    after = {d: _files(lake / d) for d in ("models", "checkpoints", "reports")}
    assert after["models"] == before["models"] and after["reports"] == before["reports"]
    # the failed run's own checkpoints are beside the last good run's, which are all still there
    assert {k: v for k, v in after["checkpoints"].items() if k in before["checkpoints"]} == before["checkpoints"]
    assert read_summary(spark, str(lake / "models" / "city"))["balanced"]


@pytest.fixture(scope="module")
def scored(spark, trained, photos, tmp_path_factory):
    lake, _ = trained
    folder = tmp_path_factory.mktemp("new") / "images"
    folder.mkdir()
    for p in photos[:5]:
        shutil.copy(p, folder / p.name)
    assert run_job("score", "--set", f"lake={lake}", "--set", f"prepare.size={SIDE}",
                   "--set", f"score.input={folder}", "--set", "score.models=[city]") == 0
    return lake, folder


def test_02_a_refused_scoring_run_leaves_the_previous_scores(scored, tmp_path, capsys):
    lake, _ = scored
    before = _files(lake / "tables" / "scores")
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    for given, said in ((tmp_path / "typo", "score.input"), (empty, "holds no images")):
        assert run_job("score", "--set", f"lake={lake}", "--set", f"prepare.size={SIDE}",
                       "--set", f"score.input={given}", "--set", "score.models=[city]") == 2
        assert said in _one_line(capsys)
        assert _files(lake / "tables" / "scores") == before


def _features(spark, lake: Path, n: int = 90, dim: int = 8, one_class: bool = False, nan: int = 0) -> str:
    """A features table (prelogit, normal and mirrored rows) with a linear signal, its summary
    carrying a run id as extract_features' does; `nan` images get a NaN in one of their rows."""
    from core.schemas import TABLES

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = 1 if one_class else i % 2
        split = "test" if i % 3 == 0 else "train"
        v = rng.normal(size=dim) + label * 1.5
        for mirrored in (False, True):
            w = v + rng.normal(0, 0.1, dim)
            if i < nan and mirrored:
                w[0] = np.nan
            rows.append((f"p{i:03d}", split, label, "mobilenet_v2", "w", "prelogit", mirrored, w.astype(float).tolist()))
    out = str(lake / "tables" / "features")
    spark.createDataFrame(rows, TABLES["features"].schema).write.mode("overwrite").parquet(out)
    write_summary(spark, Summary(stage="extract_features", input_rows=n, output_rows=n, output=out,
                                 extra={"run_id": uuid.uuid4().hex, "seed": 0}))
    return out


# the mechanics of refusals and rejects, not convergence: few optimiser iterations
SVM = ["--set", "svm.layers=[prelogit]", "--set", "svm.c_grid=[0.01,1.0]", "--set", "svm.sgd_reg_params=[0.01]",
       "--set", "svm.sgd_steps=[1.0]", "--set", "svm.rf_trees=10", "--set", "svm.max_iter=10",
       "--set", "svm.sgd_iterations=10"]


@pytest.mark.slow
def test_03_06_09_15_svm_nan_rows_folds_refusals_and_a_moved_lake(spark, tmp_path, capsys):
    from pyspark.ml import PipelineModel

    from sparkml.score import _svm_model

    lake = tmp_path / "lake"
    _features(spark, lake, nan=3)
    # 6: NaN vectors are rejected with a reason, the rest trains; 9: two and four folds work too
    for folds in (2, 4):
        assert run_job("train_svm", "--set", f"lake={lake}", *SVM, "--set", f"svm.folds={folds}",
                       "--set", "svm.engine=spark_ml") == 0
    s = read_summary(spark, str(lake / "models" / "likability_svm"))
    assert s["balanced"] and s["rejected"] == {"non_finite_features": 3} and s["output_rows"] == 87
    assert {p for p in rejects_by_reason(spark, Lake(str(lake)), "train_svm")["non_finite_features"]} == \
        {"p000", "p001", "p002"}
    # 15: the summary names its models relative to the lake: a copied lake scores with its own
    shutil.copytree(lake, tmp_path / "lake2")
    os.rename(lake, tmp_path / "lake.old")
    m = _svm_model(spark, Lake(str(tmp_path / "lake2")))
    assert m["path"].startswith(f"file://{tmp_path}/lake2/") and PipelineModel.load(m["path"]).stages
    os.rename(tmp_path / "lake.old", lake)
    # 3: a refused run leaves the previous SVM as it was; the report shows it as stale, not current
    assert run_job("report", "--set", f"lake={lake}") == 0
    assert ">Likability (#me selfies)</h2>" in (lake / "reports" / "index.html").read_text()
    before = _files(lake / "models" / "likability_svm")
    _features(spark, lake, one_class=True)
    capsys.readouterr()
    assert run_job("train_svm", "--set", f"lake={lake}", *SVM) == 2
    assert "one class only" in _one_line(capsys)
    assert _files(lake / "models" / "likability_svm") == before
    assert run_job("report", "--set", f"lake={lake}") == 0
    page = (lake / "reports" / "index.html").read_text()
    assert ">Likability (#me selfies)</h2>" not in page
    assert "models/likability_svm: stale: it was made from" in page and "tables/features" in page


def test_04_the_report_renders_a_partial_lake_and_replaces_the_old_one_only_when_done(trained, tmp_path,
                                                                                     monkeypatch):
    from sparkml import report

    lake = tmp_path / "lake"
    shutil.copytree(trained[0], lake)
    assert run_job("report", "--set", f"lake={lake}") == 0
    old = _files(lake / "reports")
    assert "report_files/city_confusion.png" in old
    # an interrupted training run: metrics without test figures, no summary; no tables/images at all
    metrics = lake / "reports" / "train_city" / "metrics.json"
    metrics.write_text(json.dumps({"history": [], "best": None}))
    (lake / "models" / "city" / "_SUMMARY.json").unlink()

    def drawn(page, cfg):
        return page.img(page.write("new.png", b"\x89PNG new"), "a new picture")

    def broken(page, cfg):
        raise KeyboardInterrupt  # the run stops while it draws (not an error a section can contain)

    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS[:2], ("Drawn", drawn, "x"), ("Broken", broken, "x")])
    with pytest.raises(KeyboardInterrupt):
        run_job("report", "--set", f"lake={lake}")
    now = {k: v for k, v in _files(lake / "reports").items() if not k.startswith(("train_city/", "report_files.new/"))}
    assert now == {k: v for k, v in old.items() if not k.startswith("train_city/")}  # the old report, whole
    monkeypatch.undo()
    assert run_job("report", "--set", f"lake={lake}") == 0
    page = (lake / "reports" / "index.html").read_text()
    assert ">City classifier</h2>" not in page and "models/city: incomplete" in page
    assert "City classifier: run jobs/train_cnn.py --task city" in page
    assert not (lake / "reports" / "report_files" / "city_confusion.png").exists()


def test_05_features_that_are_not_finite_are_rejected_rows(monkeypatch):
    import pyarrow as pa

    from sparkml import extract_features as features

    jpeg = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    import io

    buf = io.BytesIO()
    jpeg.save(buf, "JPEG")

    def fake(images, *a, **k):
        out = np.ones((len(images), 4), np.float32)
        out[1, 2] = np.inf
        return {("prelogit", False): out}

    monkeypatch.setattr(features, "extract", fake)
    batch = pa.RecordBatch.from_pydict({"post_id": ["a", "b", "c"], "split": ["train"] * 3, "label": [0, 1, 0],
                                        "image": [buf.getvalue()] * 3})
    got = features.extract_batch(batch, "m", "w", ("prelogit",), False, 0).to_pydict()
    assert got["reason"] == [None, None, "non_finite_features"] and got["post_id"] == ["a", "c", "b"]


def test_07_a_one_class_dataset_is_refused_for_training(spark, tmp_path, capsys):
    lake = tmp_path / "lake"
    _write_dataset(spark, lake, "one", "cities", {"train": [8, 8], "val": [8], "test": [8]}, ["chicago"])
    capsys.readouterr()
    assert run_job("train_cnn", "--task", "city", "--preset", "city-scratch",
                   *_sets(lake, dataset="one", processes=1, mode="inline", batch_size=8)) == 2
    assert "holds one class only" in _one_line(capsys)


def test_07_build_dataset_warns_of_one_class(spark, prepared, tmp_path, capsys):
    from pyspark.sql import functions as F

    src, _ = prepared
    lake = tmp_path / "lake"
    shutil.copytree(src.root.removeprefix("file://"), lake)
    # every post of one city, the posts' summary (and so the images' link to it) kept
    spark.read.parquet(src.table("posts")).withColumn("city", F.lit("chicago")) \
        .write.parquet(str(tmp_path / "posts"))
    shutil.copy(lake / "tables" / "posts" / "_SUMMARY.json", tmp_path / "posts")
    shutil.rmtree(lake / "tables" / "posts")
    os.rename(tmp_path / "posts", lake / "tables" / "posts")
    capsys.readouterr()
    assert run_job("build_dataset", "--set", f"lake={lake}", "--set", "dataset.ranks=1") == 0
    assert "holds one class only (['chicago'])" in capsys.readouterr().out


@pytest.mark.slow
def test_08_explore_k_is_checked_against_the_distinct_images(spark, photos, tmp_path, capsys):
    folder = tmp_path / "archive"
    folder.mkdir()
    for i in range(3):
        shutil.copy(photos[0], folder / f"copy{i}.jpg")
    lake = tmp_path / "lake"
    common = ["--set", f"lake={lake}", "--set", "source.layout=folder", "--set", f"source.path={folder}"]
    for job in ("ingest", "prepare_images"):
        assert run_job(job, *common) == 0
    capsys.readouterr()
    assert run_job("explore", *common, "--set", "explore.features=pixels", "--set", "explore.k=2",
                   "--set", "explore.k_range=[2]") == 2
    assert "explore.k=2 clusters need more than 2 distinct images" in _one_line(capsys)
    with pytest.raises(SystemExit) as exited:  # refused while the options are parsed
        run_job("explore", *common, "--set", "explore.k_range=[0,-3,1]")
    assert exited.value.code == 2 and "config key 'explore.k_range.0'" in _one_line(capsys)
    for p in photos[1:6]:
        shutil.copy(p, folder / p.name)
    for job in ("ingest", "prepare_images"):
        assert run_job(job, *common) == 0
    assert run_job("explore", *common, "--set", "explore.features=pixels", "--set", "explore.k=2",
                   "--set", "explore.k_range=[2,3,10]", "--set", "explore.tsne_sample=10") == 0
    metrics = json.loads((lake / "reports" / "explore" / "metrics.json").read_text())
    assert set(metrics["silhouettes"]) == {"2", "3"} and metrics["skipped_k"] == {
        "10": "needs more than 10 distinct images, there are 6"}


def test_10_12_an_export_never_reaches_outside_its_folder_and_one_bad_post_costs_only_itself(spark, photos,
                                                                                          tmp_path):
    root = tmp_path / "export"
    truth = make_export(root, photos[:4])
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(photos[10], secret)
    media = root / "media" / "posts"
    os.symlink(secret, media / "link.jpg")
    posts_file = root / "content" / "posts_1.json"
    posts = json.loads(posts_file.read_text())
    posts += [{"media": [{"uri": uri, "creation_timestamp": 1_700_000_000}]} for uri in
              ("../outside/secret.jpg", str(secret), f"file://{secret}", "media/posts/link.jpg")]
    posts.append({"title": ["a", "list"], "media": [{"uri": "media/posts/x.jpg", "creation_timestamp": 1}]})
    shutil.copy(photos[6], media / "late.jpg")
    posts.append({"media": [{"uri": "media/posts/late.jpg", "creation_timestamp": 99999999999999999999}]})
    posts_file.write_text(json.dumps(posts))
    lake = tmp_path / "lake"
    assert run_job("ingest", "--set", f"lake={lake}", "--set", "source.layout=instagram",
                   "--set", f"source.path={root}") == 0
    got = spark.read.parquet(str(lake / "tables" / "posts")).toPandas()
    secret_bytes = secret.read_bytes()
    assert not any(b == secret_bytes for b in got.image_bytes)
    bad_rows = spark.read.parquet(str(lake / "tables" / "rejected" / "stage=ingest")).toPandas()
    outside = bad_rows[bad_rows.reason == "path_outside_archive"]
    assert len(outside) == 4 and set(outside.post_id) == {"secret", "link"}
    assert (bad_rows.detail.str.contains("title is a list, not text")).sum() == 1
    s = read_summary(spark, str(lake / "tables" / "posts"))
    assert s["balanced"] and s["flags"]["bad_posted_at"] == 1
    assert set(truth["images"]) | {"late"} == set(got.post_id)  # the rest of the export is in
    assert got.posted_at[got.post_id == "late"].isna().all()


def test_10_11_a_folder_with_a_symlink_loop_and_a_link_out(spark, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder / p.name)
    os.symlink(".", folder / "loop")
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(photos[5], outside)
    os.symlink(outside, folder / "out.jpg")
    lake = tmp_path / "lake"
    assert run_job("ingest", "--set", f"lake={lake}", "--set", "source.layout=folder",
                   "--set", f"source.path={folder}") == 0
    got = spark.read.parquet(str(lake / "tables" / "posts")).toPandas()
    assert sorted(got.post_id) == sorted(p.stem for p in photos[:2])
    s = read_summary(spark, str(lake / "tables" / "posts"))
    assert s["symlinked_folders_not_followed"] == 1 and s["rejected"] == {"path_outside_archive": 1}


def test_13_a_model_json_that_does_not_fit_its_schema_is_one_line(scored, tmp_path, capsys):
    lake, folder = scored
    root = lake / "models" / "city"
    good = (root / "model.json").read_text()
    meta = json.loads(good)
    cases = {
        "truncated": (good[: len(good) // 2], "is not JSON"),
        "no preprocessing": (json.dumps({k: v for k, v in meta.items() if k != "preprocessing"}),
                             "preprocessing: Field required"),
        "unknown key": (json.dumps({**meta, "model_kwargs": {"bogus": 1}}), "model_kwargs: unknown key"),
        "crop larger than the images": (json.dumps({**meta, "preprocessing": {**meta["preprocessing"],
                                                                              "crop": SIDE + 1}}), "is larger than"),
    }
    try:
        for name, (text, said) in cases.items():
            (root / "model.json").write_text(text)
            capsys.readouterr()
            assert run_job("score", "--set", f"lake={lake}", "--set", f"prepare.size={SIDE}",
                           "--set", f"score.input={folder}", "--set", "score.models=[city]") == 2, name
            line = _one_line(capsys)
            assert said in line and "models/city" in line, (name, line)
    finally:
        (root / "model.json").write_text(good)


def test_14_resume_past_a_truncated_checkpoint(spark, tmp_path, capsys):
    from dl import checkpoint

    lake = tmp_path / "lake"
    _write_dataset(spark, lake, "cities", "cities", {"train": [8, 8], "val": [8], "test": [8]}, CITIES)
    args = ["--task", "city", "--preset", "city-scratch",
            *_sets(lake, dataset="cities", model="squeezenet1_1", batch_size=8, processes=1, mode="inline",
                   checkpoint_every=1, epochs=2)]
    assert run_job("train_cnn", *args) == 0
    run = checkpoint.runs(str(lake / "checkpoints" / "train_city"))[-1]
    newest = checkpoint.latest(run).removeprefix("file://")
    Path(newest).write_bytes(Path(newest).read_bytes()[:1000])
    capsys.readouterr()
    assert run_job("train_cnn", *args, "--resume") == 0
    out = capsys.readouterr().out
    assert "skipped a damaged checkpoint" in out and Path(newest).name in out
    # the run resumed had completed: its best model carries on (whether or not a resumed epoch beats it)
    best = json.loads((lake / "reports" / "train_city" / "metrics.json").read_text())["best"]
    assert json.loads((lake / "models" / "city" / "model.json").read_text())["epoch"] == best["epoch"]


def test_16_17_18_launchers_validate_buckets_and_settings_and_print_no_secret(tmp_path, capsys):
    import yaml

    from deploy.common import render_profile
    from deploy.dataproc import submit
    from deploy.emr import launch
    from tests.test_deploy import _bundle

    bundle = str(_bundle(tmp_path))
    for main, bad in ((launch.main, "My_Bucket"), (launch.main, "b\nmalicious: 1"), (launch.main, "b # c"),
                      (submit.main, "Goog-bucket")):
        assert main(["--bucket", bad, "--bundle", bundle, "--dry-run"]) == 2
        assert "is not a valid" in _one_line(capsys)
    out = render_profile(ROOT / "conf" / "emr.yaml", "bkt.ok-1", tmp_path)
    tree = yaml.safe_load(out.read_text())
    assert tree["lake"] == "s3://bkt.ok-1/instalearn/lake" and set(tree) == set(yaml.safe_load(
        (ROOT / "conf" / "emr.yaml").read_text()))
    for setting, said in (("core.count=many", "setting 'core.count'"), ("exectuors=8", "unknown setting 'exectuors'")):
        assert launch.main(["--bucket", "bkt", "--bundle", bundle, "--dry-run", "--set", setting]) == 2
        assert said in _one_line(capsys)
    assert submit.main(["--bucket", "gbkt", "--bundle", bundle, "--set", "workers.count=-1"]) == 2
    assert "setting 'workers.count'" in _one_line(capsys)
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert launch.main(["--bucket", "bkt", "--bundle", bundle, "--dry-run",
                        "--set", f"spark_defaults.spark.hadoop.fs.s3a.bucket.b.sk={secret}"]) == 2
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err and "looks like a key" in captured.err
