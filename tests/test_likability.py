"""filter_followers -> detect_faces -> build_dataset (likability) on the generated sample."""

import json

import numpy as np
import pytest

from sparkml.lake import read_summary
from sparkml.schemas import SPLITS
from tests.conftest import planted, rejects_by_reason, run_job


@pytest.fixture(scope="module")
def labelled(spark, prepared):
    lake, truth = prepared
    args = ["--set", f"lake={lake.root}"]
    assert run_job("filter_followers", *args, "--set", "followers.min_age_days=1",
                   "--set", f"followers.as_of={truth['as_of']}") == 0
    assert run_job("detect_faces", *args) == 0
    return lake, truth


def test_follower_filter_accounts_and_rejects_planted_engagement(spark, labelled):
    lake, truth = labelled
    s = read_summary(spark, lake.table("likability_labels"))
    posts = read_summary(spark, lake.table("posts"))
    assert s["balanced"] and s["input_rows"] == posts["output_rows"]
    by_reason = rejects_by_reason(spark, lake, "filter_followers")
    for kind, reason in (("followers_zero", "followers_zero"), ("followers_negative", "followers_negative"),
                         ("followers_missing", "followers_missing"), ("recent_post", "too_recent")):
        want = {c["post_id"] for c in planted(truth, kind, "manifest")}
        assert want and want <= by_reason[reason], kind
    assert set(by_reason["too_recent"]) == {c["post_id"] for c in planted(truth, "recent_post", "manifest")}
    labels = spark.read.parquet(lake.table("likability_labels")).toPandas()
    assert (labels.followers > 0).all() and np.allclose(labels.ratio, labels.likes / labels.followers)
    assert abs(labels.label.mean() - 0.5) < 0.1  # the top half is good
    celebs = set(spark.read.parquet(lake.table("posts")).where("followers >= 1000000").toPandas().post_id)
    assert celebs and celebs <= by_reason["follower_outlier"]


def test_detect_faces_gives_every_image_a_row(spark, labelled):
    lake, _ = labelled
    s = read_summary(spark, lake.table("faces"))
    images = read_summary(spark, lake.table("images"))
    assert s["balanced"] and s["input_rows"] == images["output_rows"] == s["output_rows"]
    faces = spark.read.parquet(lake.table("faces")).toPandas()
    assert set(faces.detector) == {"yunet-yuface"} and json.loads(faces.params[0])["max_side"] == 200
    assert ((faces.faces == 0) == (faces.best_confidence == 0)).all()
    assert s["passed_face_filter"] == int((faces.best_confidence >= 0.8).sum())


def test_likability_dataset_round_trips(spark, labelled):
    from petastorm import make_reader

    lake, _ = labelled
    args = ["--set", f"lake={lake.root}", "--set", "dataset.labels=likability", "--set", "dataset.ranks=2"]
    # The generated sample has no real faces: filter at 0 to get every labelled image through.
    assert run_job("build_dataset", *args, "--set", "faces.min_confidence=0") == 0
    root = lake.dataset("likability")
    s = read_summary(spark, root)
    unique = read_summary(spark, lake.table("duplicates"))["output_rows"]
    labels = spark.read.parquet(lake.table("likability_labels")).toPandas().set_index("post_id")
    dups = set(spark.read.parquet(lake.table("duplicates")).toPandas().post_id)
    images = set(spark.read.parquet(lake.table("images")).toPandas().post_id) - dups
    assert s["balanced"] and s["input_rows"] == unique
    assert s["output_rows"] == len(images & set(labels.index)) and s["rejected"] == {
        "no_label": len(images - set(labels.index))}
    seen = 0
    for split in SPLITS:
        with make_reader(f"{root}/{split}", num_epochs=1, workers_count=2) as reader:
            for row in reader:
                assert row.image.shape == (300, 300, 3) and row.label == labels.label[row.post_id]
                assert row.ratio == pytest.approx(labels.ratio[row.post_id])
                seen += 1
    assert seen == s["output_rows"]
    # At the default threshold the images without a face are rejected as such, not lost.
    assert run_job("build_dataset", *args) == 0
    s = read_summary(spark, root)
    faces = spark.read.parquet(lake.table("faces")).toPandas().set_index("post_id")
    passing = {p for p in images & set(labels.index) if faces.best_confidence[p] >= 0.8}
    assert s["balanced"] and s["output_rows"] == len(passing)
    assert s["rejected"].get("no_face", 0) == len(images & set(labels.index)) - len(passing)


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


def test_face_filter_finds_the_planted_faces_and_nothing_else(spark, labelled):
    """Scored against the sample's ground truth: a detector that finds nothing (or everything) fails."""
    lake, truth = labelled
    faces = spark.read.parquet(lake.table("faces")).toPandas().set_index("post_id")
    side = read_summary(spark, lake.table("images"))["size"]
    min_conf = 0.8
    selfies = {p: m for p, m in truth["me"].items() if m["kind"] == "selfie"}
    found = 0
    for pid, m in selfies.items():
        want = [v * side / m["size"] for v in m["box"]]  # squash: the same factor on both axes
        found += any(b[4] >= min_conf and _iou(b[:4], want) >= 0.3 for b in faces.boxes[pid])
    assert len(selfies) >= 50 and found / len(selfies) >= 0.9
    memes = [p for p, m in truth["me"].items() if m["kind"] == "meme"]
    scenes = [p for p in truth["labels"] if p in faces.index]  # generated city scenes: no faces
    assert memes and (faces.best_confidence[memes] < min_conf).all()
    assert len(scenes) > 100 and (faces.best_confidence[scenes] >= min_conf).mean() <= 0.02


def test_likability_dataset_holds_the_selfies(spark, labelled):
    lake, truth = labelled
    assert run_job("build_dataset", "--set", f"lake={lake.root}", "--set", "dataset.labels=likability",
                   "--set", "dataset.name=likability_selfies", "--set", "dataset.ranks=2") == 0
    root = lake.dataset("likability_selfies")
    s = read_summary(spark, root)
    rows = spark.read.parquet(*[f"{root}/{split}" for split in SPLITS]).select(
        "post_id", "label").toPandas().set_index("post_id")
    dups = set(spark.read.parquet(lake.table("duplicates")).toPandas().post_id)
    rejected = rejects_by_reason(spark, lake, "filter_followers")
    lost = set().union(*rejected.values())
    selfies = {p for p, m in truth["me"].items() if m["kind"] == "selfie"} - dups - lost
    memes = {p for p, m in truth["me"].items() if m["kind"] == "meme"}
    assert s["balanced"] and len(rows) == s["output_rows"]
    assert len(set(rows.index) & selfies) >= 0.9 * len(selfies) and not set(rows.index) & memes
    assert len(set(rows.index) - selfies) <= 0.02 * len(truth["labels"])  # city scenes a detector took for faces
    # the planted link: close-ups and green scenes are labelled good more often
    me = truth["me"]
    good = {p: rows.label[p] for p in set(rows.index) & selfies}
    for factor in ("close", "green"):
        on = np.mean([g for p, g in good.items() if me[p][factor]])
        off = np.mean([g for p, g in good.items() if not me[p][factor]])
        assert on - off > 0.2, factor


def test_features_of_the_likability_dataset_equal_a_plain_torch_loop(spark, labelled):
    """Every image of the dataset gets fc6 and fc7, also mirrored; each vector equals the one a
    plain loop computes (PIL decode, torchvision's own transform, the network layer by layer)
    to within cosine 0.999 and 2% of its norm (the two decoders and resizers differ by a grey
    level here and there)."""
    import io

    import torch
    import torchvision
    from PIL import Image

    from dl.models import load_model

    lake, truth = labelled
    args = ["--set", f"lake={lake.root}", "--set", "dataset.labels=likability", "--set", "dataset.name=liked",
            "--set", "dataset.ranks=1"]
    assert run_job("build_dataset", *args) == 0
    assert run_job("extract_features", *args, "--set", "features.dataset=liked", "--set", "features.batch_rows=16") == 0
    s = read_summary(spark, lake.table("features"))
    feats = spark.read.parquet(lake.table("features")).toPandas()
    images = spark.read.parquet(*[f"{lake.dataset('liked')}/{sp}" for sp in SPLITS]).toPandas().set_index("post_id")
    assert s["balanced"] and s["input_rows"] == s["output_rows"] == len(images) > 40 and s["rejected"] == {}
    assert len(feats) == 4 * len(images) and set(feats.layer) == {"fc6", "fc7"} and set(feats.mirrored) == {True, False}
    assert (feats.groupby(["layer", "mirrored"]).post_id.nunique() == len(images)).all()
    first = feats.groupby("post_id").label.first()
    assert (first.sort_index() == images.label.sort_index()).all()

    net = load_model("alexnet", "none", seed=0)
    ref = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    for pid in sorted(images.index)[:12]:
        rgb = torch.from_numpy(np.asarray(Image.open(io.BytesIO(images.image[pid])).convert("RGB")).copy())
        for mirrored in (False, True):
            x = ref(rgb.permute(2, 0, 1))[None]
            x = torch.flip(x, dims=[3]) if mirrored else x
            with torch.inference_mode():
                flat = torch.flatten(net.avgpool(net.features(x)), 1)
                want = {"fc6": net.classifier[:3](flat)[0].numpy(), "fc7": net.classifier[:6](flat)[0].numpy()}
            for layer, w in want.items():
                (got,) = feats.vector[(feats.post_id == pid) & (feats.layer == layer) & (feats.mirrored == mirrored)]
                got = np.asarray(got)
                cos = got @ w / (np.linalg.norm(got) * np.linalg.norm(w))
                assert got.shape == (4096,) and cos > 0.999 and np.linalg.norm(got - w) < 0.02 * np.linalg.norm(w)
