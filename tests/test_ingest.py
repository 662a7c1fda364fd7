import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.lake import Lake, read_summary
from core.schemas import IMG_DIR
from core.schemas import POSTS
from sparkml.ingest.posts import caption_status, decode_caption
from sparkml.sample.make_sample import MANIFEST
from tests.conftest import ingest, planted, run_job


def test_decode_caption():
    assert decode_caption(None) == (None, "missing")
    assert decode_caption("caf\u00e9 #nyc\n".encode()) == ("caf\u00e9 #nyc", "ok")
    assert decode_caption(b"\xef\xbb\xbfhello") == ("hello", "ok")
    assert decode_caption(b"  \r\n") == ("", "empty")
    text, status = decode_caption(b"Portug\xa1\xad #paris")
    assert status == "not_utf8" and text == "Portug\ufffd\ufffd #paris"
    assert caption_status(None) == "missing" and caption_status(" ") == "empty" and caption_status("x") == "ok"


def _read(spark, lake: Path):
    lk = Lake(str(lake))
    posts = spark.read.parquet(lk.table("posts"))
    rejected = spark.read.parquet(lk.rejected("ingest")).toPandas()
    return posts, rejected, read_summary(spark, lk.table("posts"))


def _ingested(spark, tmp_path_factory, name: str, source, layout: str):
    lake = tmp_path_factory.mktemp(name)
    assert ingest(lake, source, layout) == 0
    return _read(spark, lake)


def _ids(rejected: pd.DataFrame, reason: str) -> set:
    return set(rejected.loc[rejected.reason == reason, "post_id"])


@pytest.fixture(scope="module")
def instacities_run(spark, sample, tmp_path_factory):
    root, truth = sample
    return _ingested(spark, tmp_path_factory, "lake_ic", root, "instacities"), truth, root


def test_instacities_accounts_for_every_file(instacities_run):
    (posts, rejected, summary), truth, root = instacities_run
    orphans = planted(truth, "image_missing")
    assert summary["input_rows"] == truth["image_files"] + len(orphans)
    assert summary["balanced"] and summary["input_rows"] == summary["output_rows"] + sum(summary["rejected"].values())
    assert summary["output_rows"] == posts.count() == posts.select("post_id").distinct().count()
    assert _ids(rejected, "empty_image") == {c["post_id"] for c in planted(truth, "zero_byte")}
    assert _ids(rejected, "image_missing") == {c["post_id"] for c in orphans}
    assert _ids(rejected, "duplicate_post") == {c["post_id"] for c in planted(truth, "duplicate_post")}
    assert summary["rejected"] == {"empty_image": len(planted(truth, "zero_byte")), "image_missing": len(orphans),
                                   "duplicate_post": len(planted(truth, "duplicate_post"))}
    (dup,) = planted(truth, "duplicate_post")
    kept = posts.where(f"post_id = '{dup['post_id']}'").first()
    assert kept.city == dup["kept_city"]
    assert dup["dropped_city"] in rejected.loc[rejected.reason == "duplicate_post", "detail"].iloc[0]


def test_instacities_keeps_bytes_and_flags_captions(instacities_run):
    (posts, rejected, summary), truth, root = instacities_run
    assert [(f.name, f.dataType) for f in posts.schema] == [(f.name, f.dataType) for f in POSTS]
    df = posts.drop("image_bytes").toPandas().set_index("post_id")
    status = df["caption_status"]
    assert set(status[status == "not_utf8"].index) == {c["post_id"] for c in planted(truth, "caption_not_utf8")}
    assert set(status[status == "missing"].index) == {c["post_id"] for c in planted(truth, "caption_missing")}
    assert set(status[status == "empty"].index) == {c["post_id"] for c in planted(truth, "caption_empty")}
    assert summary["caption_status"] == status.value_counts().to_dict()
    for case in planted(truth, "caption_not_utf8"):
        assert "\ufffd" in df.loc[case["post_id"], "caption"]
    # Broken and odd images pass ingest untouched: judging pixels is image preparation's job.
    for kind in ("truncated", "not_an_image", "png", "gif", "webp", "cmyk", "exif_rotated", "decompression_bomb"):
        for case in planted(truth, kind):
            row = posts.where(f"post_id = '{case['post_id']}'").select("image_uri", "image_bytes").first()
            assert bytes(row.image_bytes) == Path(row.image_uri[len("file://"):]).read_bytes()
    for pid, lab in truth["labels"].items():
        if pid in df.index and pid not in {c["post_id"] for c in planted(truth, "duplicate_post")}:
            assert df.loc[pid, "city"] == lab["city"]


@pytest.fixture(scope="module")
def manifest_run(spark, sample, tmp_path_factory):
    root, truth = sample
    return _ingested(spark, tmp_path_factory, "lake_mf", root / MANIFEST, "manifest"), truth, root


def test_manifest_accounts_for_every_row(manifest_run):
    (posts, rejected, summary), truth, root = manifest_run
    assert summary["input_rows"] == truth["manifest_rows"]
    assert summary["balanced"]
    assert summary["rejected"] == {kind: len(planted(truth, case, "manifest")) for kind, case in (
        ("bad_manifest_row", "bad_manifest_row"), ("duplicate_post", "duplicate_post"), ("empty_image", "zero_byte"),
        ("image_missing", "image_missing"))}
    assert summary["output_rows"] == truth["manifest_rows"] - sum(summary["rejected"].values())
    assert set(truth["me"]) <= set(posts.select("post_id").toPandas().post_id)
    assert _ids(rejected, "image_missing") == {c["post_id"] for c in planted(truth, "image_missing")}
    assert _ids(rejected, "empty_image") == {c["post_id"] for c in planted(truth, "zero_byte")}
    assert rejected.loc[rejected.reason == "bad_manifest_row", "detail"].tolist() == ["missing post_id"]


def test_manifest_carries_engagement_fields(manifest_run):
    (posts, rejected, summary), truth, root = manifest_run
    df = posts.drop("image_bytes").toPandas().set_index("post_id")
    rows = {r["post_id"]: r for r in map(json.loads, (root / MANIFEST).read_text().splitlines()) if r["post_id"]}
    (neg,) = planted(truth, "followers_negative", "manifest")
    (nul,) = planted(truth, "followers_missing", "manifest")
    assert df.loc[neg["post_id"], "followers"] == -5  # kept as given: the follower filter judges it
    assert pd.isna(df.loc[nul["post_id"], "followers"])
    some = df.index[0]
    assert df.loc[some, "likes"] == rows[some]["likes"] and df.loc[some, "user_id"] == rows[some]["user_id"]
    assert df.loc[some, "posted_at"] == pd.Timestamp(rows[some]["posted_at"]).tz_convert(None)
    assert summary["flags"] == {"bad_likes": 0, "bad_followers": 0, "bad_posted_at": 0}


def test_csv_and_parquet_manifests_with_odd_values(spark, sample, tmp_path):
    root, truth = sample
    imgs = sorted((root / IMG_DIR).rglob("*.jpg"))[:4]
    # the manifests in a folder of their own (the sample is shared, read only): a relative image
    # resolves against the manifest's folder, where a copy of the third image lies
    base, rel = tmp_path / "src", imgs[2].relative_to(root)
    (base / rel).parent.mkdir(parents=True)
    shutil.copy(imgs[2], base / rel)
    rows = pd.DataFrame({
        "post_id": ["a1", "a2", "a3", "a4", "a5"],
        "image": [str(imgs[0]), f"file://{imgs[1]}", str(rel), str(imgs[3]), "nope/x.jpg"],
        "caption": ["multi\nline, \"quoted\"", None, "", "ok", "gone"],
        "likes": ["12", "abc", "3.0", None, "1"],
        "followers": ["100", "200", "-1", "7", "1"],
        "posted_at": ["2017-05-01T10:00:00Z", "1500000000", "yesterday", None, None],
    })
    csv = base / "m.csv"
    rows.to_csv(csv, index=False)
    pq_path = base / "m.parquet"
    rows.to_parquet(pq_path)
    for i, path in enumerate((csv, pq_path)):
        lake = tmp_path / f"lake{i}"
        assert ingest(lake, path, "manifest") == 0
        posts, rejected, summary = _read(spark, lake)
        df = posts.drop("image_bytes").toPandas().set_index("post_id").sort_index()
        assert list(df.index) == ["a1", "a2", "a3", "a4"]
        assert summary["rejected"] == {"image_missing": 1}
        assert summary["flags"] == {"bad_likes": 1, "bad_followers": 0, "bad_posted_at": 1}
        assert df.loc["a1", "caption"] == 'multi\nline, "quoted"'
        # CSV cannot tell an empty caption from a missing one; Parquet can
        assert list(df["caption_status"]) == ["ok", "missing", "missing" if path == csv else "empty", "ok"]
        assert df.loc["a1", "likes"] == 12 and pd.isna(df.loc["a2", "likes"]) and df.loc["a3", "likes"] == 3
        assert df.loc["a2", "posted_at"] == pd.Timestamp(1500000000, unit="s")
        assert pd.isna(df.loc["a3", "posted_at"])
        assert df.loc["a3", "image_uri"] == f"file://{base / rel}"


def test_split_layout_and_stray_files(spark, sample, tmp_path):
    root, truth = sample
    src = sorted((root / IMG_DIR / "london").glob("*.jpg"))[:3]
    tree = tmp_path / "split"
    for split, img in zip(("train", "val", "test"), src):
        (tree / "img" / split / "london").mkdir(parents=True)
        shutil.copy(img, tree / "img" / split / "london" / img.name)
        (tree / "captions" / split / "london").mkdir(parents=True)
        (tree / "captions" / split / "london" / (img.stem + ".txt")).write_text(f"#london {split}")
    (tree / "img" / "stray.jpg").write_bytes(src[0].read_bytes())            # wrong depth
    (tree / "img" / "train" / "london" / "notes.md").write_text("hi")      # not an image
    (tree / "img" / "other" / "london").mkdir(parents=True)
    shutil.copy(src[0], tree / "img" / "other" / "london" / "9.jpg")       # not a split
    lake = tmp_path / "lake"
    assert ingest(lake, tree, "instacities") == 0
    posts, rejected, summary = _read(spark, lake)
    df = posts.drop("image_bytes").toPandas().set_index("post_id")
    assert {df.loc[img.stem, "split"] for img in src} == {"train", "val", "test"}
    assert all(df.loc[img.stem, "caption"] == f"#london {df.loc[img.stem, 'split']}" for img in src)
    assert summary["rejected"] == {"unrecognized_file": 3}
    assert summary["input_rows"] == 6 and summary["output_rows"] == 3


def test_rerun_replaces_outputs(spark, sample, tmp_path):
    root, truth = sample
    args = ["--set", f"lake={tmp_path}", "--set", f"source.path={root / MANIFEST}", "--set", "source.layout=manifest"]
    def ids_and_rejects():
        posts, rejected, _ = _read(spark, tmp_path)
        return sorted(posts.select("post_id").toPandas().post_id), len(rejected)

    assert run_job("ingest", *args) == 0
    first = ids_and_rejects()
    assert run_job("ingest", *args) == 0
    assert ids_and_rejects() == first  # rejects of the stage are replaced, not appended
    files = pq.ParquetDataset(str(Path(tmp_path) / "tables" / "posts")).files
    assert files and all(Path(f).suffix == ".parquet" for f in files)


def test_missing_source_exits_2(spark, tmp_path, capsys):
    assert ingest(tmp_path, f"{tmp_path}/nothing.jsonl", "manifest") == 2
    assert "does not exist" in capsys.readouterr().err
    assert ingest(tmp_path, tmp_path, "instacities") == 2
