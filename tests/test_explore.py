"""jobs/explore.py on an Instagram-export-shaped archive of the 396 real photos plus three
planted groups of near-uniform images (red, green, blue): K-Means keeps each group whole, in
a cluster of its own whose centre it forms; every k of the range gets a silhouette, the
t-SNE map and contact sheets are drawn."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_export, run_job

GROUPS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def archive(spark, photos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(3)
    planted = []
    for name, rgb in GROUPS.items():
        for i in range(12):
            p = tmp / "planted" / f"{name}-{i:02d}.jpg"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 12, (320, 320, 3)), 0, 255).astype(np.uint8)) \
                .save(p, quality=92)
            planted.append(p)
    order = list(photos) + planted
    rng.shuffle(order)
    truth = make_export(tmp / "export", order)
    lake = tmp / "lake"
    args = ["--set", f"lake={lake}"]
    assert run_job("ingest", *args, "--set", "source.layout=instagram", "--set", f"source.path={tmp / 'export'}") == 0
    assert run_job("prepare_images", *args) == 0
    # post_id = the media file's stem: '<photo stem>_<post>_<index>' (make_export)
    groups = {g: {p for p in truth["images"] if p.startswith(g + "_")} for g in GROUPS}
    assert all(len(v) == 12 for v in groups.values())
    return lake, truth, groups


def _report(lake: Path) -> Path:
    return lake / "reports" / "explore"


@pytest.mark.slow
def test_pixel_clusters_keep_each_planted_group_whole_in_its_own_cluster(spark, archive):
    lake, truth, groups = archive
    assert run_job("explore", "--set", f"lake={lake}", "--set", "explore.features=pixels", "--set", "explore.pixels=48",
                   "--set", "explore.k_range=[4,10]", "--set", "explore.map_thumbnails=120") == 0
    rows = spark.read.parquet(str(lake / "tables" / "clusters")).toPandas().set_index("post_id")
    assert set(rows.index) == set(truth["images"]) and len(rows) == 396 + 36
    assert rows.cluster.between(0, 9).all() and rows.x.notna().all() and rows.y.notna().all()
    kept = []
    for name, members in groups.items():
        clusters = set(rows.cluster[sorted(members)])
        assert len(clusters) == 1, (name, clusters)  # whole
        kept.append(clusters.pop())
        # photos far from every other centre may join (K-Means has no "none of these"), but the
        # twelve images nearest the cluster's centre are the group's
        mine = rows[rows.cluster == kept[-1]].sort_values("distance")
        assert set(mine.index[:12]) == members, name
    assert len(set(kept)) == 3  # three groups, three clusters
    metrics = json.loads((_report(lake) / "metrics.json").read_text())
    assert set(metrics["silhouettes"]) == {"4", "10"} and all(-1 <= v <= 1 for v in metrics["silhouettes"].values())
    assert sum(metrics["sizes"].values()) == len(rows) and metrics["labels"] is None
    assert "needs explore.features=model with weights whose card names the head's classes" in metrics["labels_note"]
    assert metrics["features"] == "raw pixels 48x48"
    for name in ["tsne.png", "silhouette.png"] + [f"cluster_{c:02d}.png" for c in range(10)]:
        with Image.open(_report(lake) / name) as im:
            assert im.format == "PNG" and min(im.size) >= 150, name
    s = json.loads((lake / "tables" / "clusters" / "_SUMMARY.json").read_text())
    assert s["balanced"] and s["input_rows"] == len(rows)


@pytest.mark.slow
def test_network_features_through_the_extraction_code(spark, archive):
    lake, truth, _ = archive
    assert run_job("explore", "--set", f"lake={lake}", "--set", "explore.model=alexnet", "--set", "explore.k=3",
                   "--set", "explore.weights=none", "--set", "explore.layer=fc7",
                   "--set", "explore.k_range=[2,3]", "--set", "explore.tsne_sample=60",
                   "--set", "explore.map_thumbnails=20") == 0
    rows = spark.read.parquet(str(lake / "tables" / "clusters")).toPandas()
    assert len(rows) == len(truth["images"]) and set(rows.cluster) == {0, 1, 2}
    assert rows.x.notna().sum() == 60
    metrics = json.loads((_report(lake) / "metrics.json").read_text())
    assert metrics["features"] == "alexnet fc7 (none)" and "random weights" in metrics["labels_note"]
    assert run_job("explore", "--set", f"lake={lake}", "--set", "explore.model=nonet") == 2


@pytest.mark.slow
def test_real_weights_name_the_clusters_by_what_is_in_them(spark, archive):
    """The profile's exploration: MobileNetV2 features from the shipped ImageNet weights (staged,
    with the card that names its head's classes). The cluster holding most ant photos is labelled
    'ant', the one holding most bee photos 'bee' (the most frequent top-1 classes of its images);
    the planted colour groups are not called either."""
    lake, truth, groups = archive
    assert run_job("explore", "--set", f"lake={lake}", "--set", "explore.k=5", "--set", "explore.k_range=[5]",
                   "--set", "explore.tsne_sample=60", "--set", "explore.map_thumbnails=20") == 0
    rows = spark.read.parquet(str(lake / "tables" / "clusters")).toPandas().set_index("post_id")
    metrics = json.loads((_report(lake) / "metrics.json").read_text())
    assert metrics["features"].startswith("mobilenet_v2 prelogit") and metrics["labels_note"] is None
    for insect, name in (("ants", "ant"), ("bees", "bee")):
        members = rows[[p.startswith(insect + "_") for p in rows.index]]
        assert len(members) == 192 if insect == "ants" else len(members) == 204
        top = members.cluster.value_counts().index[0]
        labels = [n for n, _ in metrics["labels"][str(top)]]
        assert labels[0] == name, (insect, metrics["labels"])
        assert (rows.category[members.index] == name).mean() > 0.5  # the network's own top-1 per photo
    planted = rows.loc[sorted(set().union(*groups.values()))]
    assert not planted.category.isin(["ant", "bee"]).any()
