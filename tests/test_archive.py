"""Ingest of a personal archive: an Instagram account export (both folder layouts the app has
used, carousels, videos, a missing media file, mojibake captions) and a plain folder of images."""

import json

import pytest

from sparkml.ingest.archive import export_media, repair_mojibake
from tests.conftest import make_export, rejects_by_reason, run_job


@pytest.mark.parametrize("text", ["Café in São Paulo 😊", "日本の夏", "plain", "naïve — façade"])
def test_mojibake_is_repaired_and_right_text_is_left_alone(text):
    assert repair_mojibake(text.encode("utf-8").decode("latin-1")) == text
    assert repair_mojibake(text) == text  # already right (or plain ASCII): unchanged
    assert repair_mojibake("déjà vu in latin-1 only \xe9") == "déjà vu in latin-1 only \xe9"  # not UTF-8 bytes


def test_export_media_reads_carousels_and_json_escapes():
    raw = json.dumps([{"media": [{"uri": "media/posts/1/a.jpg", "title": "caf\u00c3\u00a9",
                                  "creation_timestamp": 1_600_000_005}]},
                      {"title": "\u00f0\u009f\u0098\u008a", "creation_timestamp": 1_600_000_007,
                       "media": [{"uri": "media/posts/1/b.jpg"}, {"uri": "media/posts/1/c.mp4", "creation_timestamp": 5}]}])
    media = export_media(json.loads(raw))
    assert [(m["uri"], m["caption"], m["posted_at"], m["bad_time"]) for m in media] == [
        ("media/posts/1/a.jpg", "café", "1600000005", False), ("media/posts/1/b.jpg", "😊", "1600000007", False),
        ("media/posts/1/c.mp4", "😊", None, True)]  # 1970: no Instagram post's time


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.slow
def test_instagram_export_ingest(spark, tmp_path, photos, nested):
    from core.lake import Lake, read_summary

    export = tmp_path / "export"
    truth = make_export(export, photos[:17], nested=nested)
    lake = Lake(str(tmp_path / "lake"))
    assert run_job("ingest", "--set", f"lake={lake.root}", "--set", "source.layout=instagram",
                   "--set", f"source.path={export}") == 0
    posts = {r["post_id"]: r for r in spark.read.parquet(lake.table("posts")).collect()}
    assert set(posts) == set(truth["images"])
    assert truth["carousels"] == 2  # 17 photos: posts of 1, 1, 1, 1, 3, 1, 1, 1, 1, 3, 1, 1, 1
    assert {p: r["caption"] for p, r in posts.items()} == truth["images"]  # every caption repaired
    assert all(r["caption_status"] == "ok" and r["posted_at"] is not None for r in posts.values())
    assert all(r["image_bytes"][:2] == b"\xff\xd8" for r in posts.values())
    rejects = rejects_by_reason(spark, lake, "ingest")
    assert rejects == {"video": set(truth["videos"]), "image_missing": set(truth["missing"])}
    summary = read_summary(spark, lake.table("posts"))
    assert summary["input_rows"] == len(truth["images"]) + 2 and summary["balanced"]


def test_folder_ingest(spark, tmp_path, photos):
    import shutil

    from core.lake import Lake

    folder = tmp_path / "my photos"
    (folder / "2020 trip").mkdir(parents=True)
    for p in photos[:4]:
        shutil.copyfile(p, folder / p.name)
    shutil.copyfile(photos[4], folder / "2020 trip" / "día #1.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "clip.mov").write_bytes(b"\x00" * 32)
    (folder / ".DS_Store").write_bytes(b"\x00" * 8)
    lake = Lake(str(tmp_path / "lake"))
    assert run_job("ingest", "--set", f"lake={lake.root}", "--set", "source.layout=folder",
                   "--set", f"source.path={folder}") == 0
    got = {r["post_id"] for r in spark.read.parquet(lake.table("posts")).collect()}
    assert got == {p.stem for p in photos[:4]} | {"2020 trip/día #1"}
    rejects = spark.read.parquet(lake.rejected("ingest")).collect()
    assert sorted((r["reason"], r["detail"].rsplit("/", 1)[-1]) for r in rejects) == [
        ("unrecognized_file", "notes.txt"), ("video", "clip.mov")]


def test_export_without_posts_file_exits_2(tmp_path, capsys):
    (tmp_path / "export" / "media").mkdir(parents=True)
    assert run_job("ingest", "--set", f"lake={tmp_path / 'lake'}", "--set", "source.layout=instagram",
                   "--set", f"source.path={tmp_path / 'export'}") == 2
    assert "content/posts_*.json" in capsys.readouterr().err
