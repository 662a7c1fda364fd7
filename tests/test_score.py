"""jobs/score.py with a city CNN trained on the sample: its scores are the training job's own
evaluation of the same images; new images in a folder (one corrupt, one empty, one not an
image) get scores or a rejected row; models that do not fit what they would score exit 2."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import module_folder, rejects_by_reason, run_job


@pytest.fixture(scope="module")
def trained(spark, prepared, request, tmp_path_factory):
    """A copy of the prepared sample's tables with the cities dataset and a city AlexNet (random
    init, one epoch, inline) exported under models/city."""
    from core.lake import Lake

    src, truth = prepared
    with module_folder(request, tmp_path_factory, "lake_score") as folder:
        root = folder / "lake"
        # only what ingest, prepare_images and dedup wrote: other modules add models to the shared lake
        for rel in ("tables/posts", "tables/images", "tables/duplicates", "tables/rejected/stage=ingest",
                    "tables/rejected/stage=prepare_images"):
            shutil.copytree(Path(src.root.removeprefix("file://")) / rel, root / rel)
        lake = Lake(str(root))
        args = ["--set", f"lake={lake.root}"]
        assert run_job("build_dataset", *args, "--set", "dataset.ranks=1") == 0
        assert run_job("train_cnn", *args, "--task", "city", "--preset", "city-scratch", "--set", "train.mode=inline",
                       "--set", "train.processes=1", "--set", "train.epochs=1", "--set", "train.batch_size=16",
                       "--set", "train.threads=2") == 0
        yield lake


def _scores(spark, lake):
    return spark.read.parquet(lake.table("scores")).toPandas()


@pytest.mark.slow
def test_scores_are_the_training_jobs_evaluation_of_the_same_images(spark, trained):
    from dl import data
    from dl.models import load_model

    lake = trained
    test_url = f"{lake.dataset('cities')}/test"
    assert run_job("score", "--set", f"lake={lake.root}", "--set", "score.layout=images",
                   "--set", f"score.input={test_url}", "--set", "score.models=[city,topics]") == 0
    got = _scores(spark, lake).set_index("post_id")
    meta = json.loads(Path(lake.model("city").removeprefix("file://"), "model.json").read_text())
    # the training job's evaluation: its loader (centre crop, normalisation) and the exported weights
    model = load_model("alexnet", f"{lake.model('city')}/model.pt", num_classes=meta["outputs"])
    want, ids, labels = [], [], []
    with torch.inference_mode():
        for x, y, names in data.batches(test_url, 0, 1, 0, 16, None,
                                        data.Examples(crop=meta["preprocessing"]["crop"], train=False), ids=True):
            want.append(torch.softmax(model(x), 1).numpy())
            ids += names
            labels += y.tolist()
    want = np.concatenate(want)
    assert set(got.index) == set(ids) and set(got.model) == {"city"}
    for pid, p in zip(ids, want):
        probs = dict(got.city_probs[pid])
        np.testing.assert_allclose([probs[c] for c in meta["labels"]], p, atol=1e-5)
        assert got.city[pid] == meta["labels"][int(p.argmax())]
    summary = json.loads(Path(lake.model("city").removeprefix("file://"), "_SUMMARY.json").read_text())
    top1 = np.mean([meta["labels"].index(got.city[pid]) == y for pid, y in zip(ids, labels)])
    assert top1 == pytest.approx(summary["test"]["top1"])  # the figure train_cnn reported
    s = json.loads(Path(lake.table("scores").removeprefix("file://"), "_SUMMARY.json").read_text())
    assert s["balanced"] and s["output_rows"] == len(ids) and s["models"] == {"city": got.version.iloc[0]}
    assert "train_cnn.py --task topics" in s["missing_models"]["topics"]


@pytest.mark.slow
def test_a_folder_of_new_images_with_bad_files_gets_scores_and_rejects(spark, trained, photos, tmp_path):
    lake = trained
    folder = tmp_path / "new photos"
    folder.mkdir()
    for p in photos[:5]:
        shutil.copyfile(p, folder / p.name)
    (folder / "half.jpg").write_bytes(photos[5].read_bytes()[:3000])  # cut short: truncated
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<html><body>404</body></html>")
    (folder / "notes.txt").write_text("not an image")
    assert run_job("score", "--set", f"lake={lake.root}", "--set", f"score.input={folder}") == 0
    got = _scores(spark, lake)
    assert sorted(got.post_id) == sorted(p.stem for p in photos[:5]) and set(got.model) == {"city"}
    assert all(abs(sum(dict(c).values()) - 1) < 1e-4 for c in got.city_probs)
    assert rejects_by_reason(spark, lake, "score") == {"truncated_image": {"half"}, "empty_image": {"empty"},
                                                       "not_an_image": {"page"}, "unrecognized_file": {None}}
    s = json.loads(Path(lake.table("scores").removeprefix("file://"), "_SUMMARY.json").read_text())
    assert s["input_rows"] == 9 and s["output_rows"] == 5 and s["balanced"]
    # the lake's training data is left alone
    assert spark.read.parquet(lake.table("images")).where("post_id = 'half'").count() == 0


def test_models_that_do_not_fit_the_input_exit_2(spark, trained, photos, tmp_path, capsys):
    lake = trained
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copyfile(photos[0], folder / "a.jpg")
    base = ["--set", f"lake={lake.root}", "--set", f"score.input={folder}"]
    assert run_job("score", *base, "--set", "prepare.size=256") == 2
    assert "trained on 300 px prepared images" in capsys.readouterr().err
    assert run_job("score", *base, "--set", "score.labels=[paris,rome]") == 2
    assert "score.labels asks for ['paris', 'rome']" in capsys.readouterr().err
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"post_id": "x", "image": str(photos[1]), "city": "paris"}) + "\n")
    assert run_job("score", "--set", f"lake={lake.root}", "--set", f"score.input={manifest}",
                   "--set", "score.layout=manifest") == 2
    assert "the input holds posts of ['paris']" in capsys.readouterr().err
    assert run_job("score", "--set", f"lake={tmp_path / 'empty_lake'}", "--set", f"score.input={folder}") == 2
    assert "no model to score with" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(spark, trained, photos, tmp_path):
    """The report of a lake where ingest .. dedup, the city CNN, LDA retrieval, scoring and an
    exploration ran: every section of those, likability listed as not run; opened in headless
    Chromium every image loads and the console has no errors; the screenshot is kept."""
    from tests.conftest import open_in_chromium

    lake = trained
    args = ["--set", f"lake={lake.root}"]
    folder = tmp_path / "new"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copyfile(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert run_job("score", *args, "--set", f"score.input={folder}") == 0
    for job in ("train_lda", "infer_topics", "evaluate_retrieval"):
        assert run_job(job, *args, "--set", "lda.num_topics=8", "--set", "lda.min_count=2") == 0, job
    assert run_job("explore", *args, "--set", "explore.features=pixels", "--set", "explore.pixels=32",
                   "--set", "explore.k=4", "--set", "explore.k_range=[3,4]", "--set", "explore.map_thumbnails=30") == 0
    assert run_job("report", *args) == 0
    reports = Path(lake.report().removeprefix("file://"))
    index = reports / "index.html"
    text = index.read_text()
    for title in ("Dataset accounting", "City classifier", "Image topics and text-to-image retrieval",
                  "Personal archive exploration", "Batch scoring of new images"):
        assert f">{title}</h2>" in text, title
    assert "Likability (#me selfies): run jobs/train_svm.py" in text  # listed as not run
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert "<script" not in text and links and all("://" not in u and not u.startswith("/") for u in links), links
    got = open_in_chromium(index, reports / "screenshot.png")
    assert got["title"] == "instalearn report" and len(got["images"]) >= 15
    assert [i for i in got["images"] if not (i[1] and i[2] > 0)] == []  # every image loads
    assert got["errors"] == []
    with Image.open(reports / "screenshot.png") as shot:
        assert shot.size[0] == 1300 and shot.size[1] > 3000
    print(f"report screenshot: {reports / 'screenshot.png'}")


def test_a_damaged_model_file_exits_2_with_one_line(spark, trained, photos, tmp_path, capsys):
    lake = tmp_path / "lake"
    shutil.copytree(Path(trained.model("city").removeprefix("file://")), lake / "models" / "city")
    pt = lake / "models" / "city" / "model.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])  # a copy cut short
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copyfile(photos[0], folder / "a.jpg")
    capsys.readouterr()
    assert run_job("score", "--set", f"lake={lake}", "--set", f"score.input={folder}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models/city" in err[0] and "the file is damaged" in err[0], err  # its card's sha256
    # without the sha256 in its card, the cut file is no checkpoint
    meta = json.loads((lake / "models" / "city" / "model.json").read_text())
    meta["card"]["sha256"] = None
    (lake / "models" / "city" / "model.json").write_text(json.dumps(meta))
    assert run_job("score", "--set", f"lake={lake}", "--set", f"score.input={folder}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models/city" in err[0] and "not a torch checkpoint" in err[0], err
