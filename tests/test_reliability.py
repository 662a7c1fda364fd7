"""Issue 18: bad input never kills a job and is never lost; a failed stage never looks complete.

Each test here failed before its fix (the defect list of the issue, numbered as there)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.lake import Lake, Summary, read_summary
from tests.conftest import ROOT, ingest, rejects_by_reason, run_job


def _posts(spark, lake: Path) -> dict:
    return {r["post_id"]: r for r in spark.read.parquet(Lake(str(lake)).table("posts")).collect()}


# ---------------------------------------------------------------- 1, 12: the per-image path


def test_fuzzed_images_end_as_output_or_reject():
    """A few hundred seeded mutations (bit flips, truncations, header fields, markers removed)
    of JPEG, PNG, GIF and WebP files: none raises, none is slow (`make fuzz` runs 100,000)."""
    from tests.fuzz import fuzz

    r = fuzz(400, seed=18)
    assert r["failures"] == [] and sum(r["outcomes"].values()) == 400
    assert r["outcomes"].get("ok", 0) > 40 and r["outcomes"].get("corrupt_image", 0) > 40  # both ends reached
    # the case `make fuzz` found before the fix: a JPEG whose SOF sampling byte is 0x06 made
    # Pillow's JPEG plugin raise KeyError, which stopped prepare_images for every image
    r = fuzz(1, seed=0, start=76113)
    assert r["failures"] == [] and r["outcomes"] == {"corrupt_image": 1}


def test_damaged_sof_and_pillow_errors_are_rejects(photos):
    """Pillow's plugins raise more than the documented types on damaged headers: any exception
    from the decoders is the file's reject."""
    from PIL import Image

    from sparkml.images import resize as images
    from sparkml.images.resize import Rejected, prepare_image

    original = Image.open

    def raising(*a, **k):
        raise KeyError("a plugin's table lookup on a damaged header")

    Image.open = raising
    try:
        data = photos[0].read_bytes()
        exif_jpeg = io.BytesIO()
        im = original(photos[0])
        exif = Image.Exif()
        exif[0x0112] = 3
        im.save(exif_jpeg, "JPEG", exif=exif.tobytes())
        out = prepare_image(exif_jpeg.getvalue(), size=64)  # has Exif: goes through Pillow's open
    finally:
        Image.open = original
    assert isinstance(out, Rejected) and out.reason.value == "corrupt_image" and "KeyError" in out.detail
    assert not isinstance(prepare_image(data, size=64), Rejected)
    assert images.Image.open is original


def test_jpeg_claiming_more_rows_than_its_data_is_truncated(photos):
    from sparkml.images.resize import Rejected, prepare_image
    from tests.fuzz import _jpeg_segments

    data = bytearray(photos[1].read_bytes())
    [(s, _)] = [(s, e) for m, s, e in _jpeg_segments(bytes(data)) if m in (0xC0, 0xC2)][:1]
    h = struct.unpack(">H", data[s + 5:s + 7])[0]
    data[s + 5:s + 7] = struct.pack(">H", h * 2)
    out = prepare_image(bytes(data), size=64)
    assert isinstance(out, Rejected) and out.reason.value == "truncated_image", out


def test_float_tiff_keeps_its_values():
    from PIL import Image

    from sparkml.images.resize import prepare_image

    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp, "F").save(buf, "TIFF")
    out = prepare_image(buf.getvalue(), size=64)
    got = np.asarray(Image.open(io.BytesIO(out.image)).convert("L"), np.float64)
    assert abs(got.mean() - 127.5) < 3 and got[:, -1].mean() > 240 and got[:, 0].mean() < 15


# ---------------------------------------------------------------- 2: a failed stage never looks complete


def test_unbalanced_counts_write_no_summary(spark, tmp_path):
    from core import cli
    from core.lake import FAILED_FILE, SUMMARY_FILE

    out = tmp_path / "out"
    out.mkdir()

    def body(spark, cfg, args):
        return Summary(stage="probe", input_rows=3, output_rows=1, rejected={"x": 1}, output=str(out))

    rc = cli.run("probe", "", body, ["--config", str(ROOT / "conf" / "local.yaml"), "--set", f"lake={tmp_path}"])
    assert rc == 1
    assert not (out / SUMMARY_FILE).exists() and json.loads((out / FAILED_FILE).read_text())["balanced"] is False


def test_two_caption_files_for_one_post(spark, tmp_path, photos):
    from core.schemas import CAP_DIR, IMG_DIR

    root = tmp_path / "insta"
    (root / IMG_DIR / "paris").mkdir(parents=True)
    (root / CAP_DIR / "paris").mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        shutil.copyfile(p, root / IMG_DIR / "paris" / f"{i}.jpg")
        (root / CAP_DIR / "paris" / f"{i}.txt").write_text(f"caption {i}")
    (root / CAP_DIR / "paris" / "1.TXT").write_text("the same post's second caption")
    assert ingest(tmp_path / "lake", root, "instacities") == 0
    posts = spark.read.parquet(Lake(str(tmp_path / "lake")).table("posts")).select("post_id", "caption").collect()
    assert sorted((r["post_id"], r["caption"]) for r in posts) == [("0", "caption 0"), ("1", "caption 1"),
                                                                   ("2", "caption 2")]
    rej = spark.read.parquet(Lake(str(tmp_path / "lake")).rejected("ingest")).collect()
    assert [(r["reason"], r["detail"].split(": a second")[0].rsplit("/", 1)[-1]) for r in rej] == [("unrecognized_file", "1.TXT")]
    s = read_summary(spark, Lake(str(tmp_path / "lake")).table("posts"))
    assert s["balanced"] and s["input_rows"] == 4


# ---------------------------------------------------------------- 3, 4, 10: manifest rows


def test_bad_paths_become_rejects_and_odd_names_work(spark, tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    odd = ["a #1.jpg", "what?.jpg", "50% off.jpg", "space  two.jpg"]
    for name, p in zip(odd, photos):
        shutil.copyfile(p, folder / name)
    rows = [{"post_id": f"odd{i}", "image": f"imgs/{n}"} for i, n in enumerate(odd)]
    rows += [{"post_id": "nul", "image": "imgs/a\u0000b.jpg"},
             {"post_id": "long", "image": "imgs/" + "x" * 300 + ".jpg"},
             {"post_id": "missing", "image": "imgs/nothere.jpg"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ingest(tmp_path / "lake", manifest) == 0
    posts = _posts(spark, tmp_path / "lake")
    assert set(posts) == {f"odd{i}" for i in range(len(odd))}
    assert all(posts[f"odd{i}"]["image_bytes"] == photos[i].read_bytes() for i in range(len(odd)))
    rej = rejects_by_reason(spark, Lake(str(tmp_path / "lake")), "ingest")
    assert rej == {"bad_manifest_row": {"nul", "long"}, "image_missing": {"missing"}}


def test_odd_names_in_the_instacities_layout(spark, tmp_path, photos):
    from core.schemas import IMG_DIR

    city = tmp_path / "insta" / IMG_DIR / "new york"
    city.mkdir(parents=True)
    for name, p in zip(["1#2.jpg", "3?4.jpg", "5 6.jpg"], photos):
        shutil.copyfile(p, city / name)
    assert ingest(tmp_path / "lake", tmp_path / "insta", "instacities") == 0
    assert set(_posts(spark, tmp_path / "lake")) == {"1#2", "3?4", "5 6"}


def test_duplicate_post_keeps_the_first_row_with_a_usable_image(spark, tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        shutil.copyfile(photos[i], folder / f"{i}.jpg")
    rows = [{"post_id": "p", "image": "imgs/2.jpg", "caption": "first"},      # first row of the input
            {"post_id": "p", "image": "imgs/0.jpg", "caption": "second"},     # lower path: was kept
            {"post_id": "q", "image": "imgs/gone.jpg", "caption": "missing"},  # first, but no image
            {"post_id": "q", "image": "imgs/1.jpg", "caption": "valid"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ingest(tmp_path / "lake", manifest) == 0
    posts = _posts(spark, tmp_path / "lake")
    assert {k: v["caption"] for k, v in posts.items()} == {"p": "first", "q": "valid"}
    assert rejects_by_reason(spark, Lake(str(tmp_path / "lake")), "ingest") == {"duplicate_post": {"p", "q"}}


# ---------------------------------------------------------------- 5, 7, 12: CSV and JSON Lines records


def test_csv_records_are_all_accounted(spark, tmp_path, photos):
    for i in range(5):
        shutil.copyfile(photos[i], tmp_path / f"{i}.jpg")
    csv = (b"post_id,image,caption\n"
           b"0,0.jpg,plain\n"
           b'1,1.jpg,"two\nlines, quoted"\n'
           b'2,2.jpg,"an unclosed quote\n'            # swallowed every row after it before
           b"3,3.jpg,after the bad one\n"
           b"x,0.jpg,shifted,extra column\n"         # more fields than the header
           b"\n"
           b"4,4.jpg,caf\xe9 latin-1\n")
    (tmp_path / "m.csv").write_bytes(csv)
    assert ingest(tmp_path / "lake", tmp_path / "m.csv") == 0
    posts = _posts(spark, tmp_path / "lake")
    assert {k: (v["caption"], v["caption_status"]) for k, v in posts.items()} == {
        "0": ("plain", "ok"), "1": ("two\nlines, quoted", "ok"), "3": ("after the bad one", "ok"),
        "4": ("caf\ufffd latin-1", "not_utf8")}
    rej = spark.read.parquet(Lake(str(tmp_path / "lake")).rejected("ingest")).toPandas()
    assert sorted(rej.reason) == ["bad_manifest_row", "bad_manifest_row"]
    assert any("unexpected end of data" in d and "2,2.jpg" in d for d in rej.detail)
    assert any("4 fields where the header has 3" in d for d in rej.detail)
    s = read_summary(spark, Lake(str(tmp_path / "lake")).table("posts"))
    assert s["balanced"] and s["input_rows"] == 6  # six records; the blank line is none


def test_json_lines_records_are_all_accounted(spark, tmp_path, photos):
    import pyarrow.parquet as pq

    for i in range(3):
        shutil.copyfile(photos[i], tmp_path / f"{i}.jpg")
    lines = [b'{"post_id": "0", "image": "0.jpg", "caption": "caf\xe9", "followers": 10}',  # invalid UTF-8
             b"[]",
             b'[{"post_id": "a", "image": "0.jpg"}, {"post_id": "b", "image": "1.jpg"}]',
             b'{"post_id": "1", "image": "1.jpg", "followers": 12.7}',
             b'{"post_id": "2", "image": "2.jpg", "followers": "12.0", "likes": 1e3}',
             b"",
             b'{"post_id": "3", "image": "0.jpg", "caption": ["a", "list"]}']
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    lake = Lake(str(tmp_path / "lake"))
    assert ingest(tmp_path / "lake", tmp_path / "m.jsonl") == 0
    posts = _posts(spark, tmp_path / "lake")
    assert set(posts) == {"0", "1", "2"}
    assert posts["0"]["caption"] == "caf\ufffd" and posts["0"]["caption_status"] == "not_utf8"
    assert posts["1"]["followers"] is None and posts["2"]["followers"] == 12 and posts["2"]["likes"] == 1000
    s = read_summary(spark, lake.table("posts"))
    assert s["balanced"] and s["input_rows"] == 6 and s["flags"]["bad_followers"] == 1
    # the rejected table is valid UTF-8 for every reader
    table = pq.read_table(lake.rejected("ingest"))
    details = table.column("detail").to_pylist()
    assert len(details) == 3 and all(isinstance(d, str) for d in details)
    assert sum("an array, not one JSON object" in d for d in details) == 2


# ---------------------------------------------------------------- 8, 11: one line, exit 2


@pytest.mark.parametrize("case", ["unwritable_lake", "spark_setting", "csv_as_parquet", "mixed_folder"])
def test_bad_setups_exit_2_with_one_line(spark, tmp_path, capsys, case, photos):
    shutil.copyfile(photos[0], tmp_path / "0.jpg")
    (tmp_path / "m.csv").write_text("post_id,image\n0,0.jpg\n")
    lake, source, sets = tmp_path / "lake", tmp_path / "m.csv", []
    if case == "unwritable_lake":
        (tmp_path / "a_file").write_text("x")
        lake = tmp_path / "a_file" / "lake"
    elif case == "spark_setting":
        sets = ["spark.sql.shuffle.partitions=lots"]
    elif case == "csv_as_parquet":
        shutil.copyfile(tmp_path / "m.csv", tmp_path / "m.parquet")
        source = tmp_path / "m.parquet"
    else:
        (tmp_path / "dir").mkdir()
        shutil.copyfile(tmp_path / "m.csv", tmp_path / "dir" / "a.csv")
        (tmp_path / "dir" / "b.jsonl").write_text('{"post_id": "1", "image": "0.jpg"}\n')
        source = tmp_path / "dir"
    capsys.readouterr()
    assert ingest(lake, source, "manifest", *sets) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ingest.py")]
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err


def test_a_folder_of_json_lines_is_a_manifest(spark, tmp_path, photos):
    (tmp_path / "parts").mkdir()
    for i in range(4):
        shutil.copyfile(photos[i], tmp_path / f"{i}.jpg")
        (tmp_path / "parts" / f"part-{i}.jsonl").write_text(json.dumps({"post_id": str(i), "image": f"../{i}.jpg"}) + "\n")
    assert ingest(tmp_path / "lake", tmp_path / "parts") == 0
    assert set(_posts(spark, tmp_path / "lake")) == {"0", "1", "2", "3"}


def test_config_edge_cases(tmp_path):
    from core.config import ConfigError, load_config

    conf = ROOT / "conf" / "local.yaml"
    with pytest.raises(ConfigError, match="'lake'.*must not be empty"):
        load_config(conf, ["lake="])
    assert load_config(conf, ["lake=2024"]).lake == "2024"
    assert load_config(conf, ["source.path=./my #1 export"]).source.path == "./my #1 export"
    assert load_config(conf, ["spark.sql.shuffle.partitions=4"]).spark["sql.shuffle.partitions"] == 4


# ---------------------------------------------------------------- security


def test_no_credential_reaches_any_output(spark, tmp_path, photos, capfd, monkeypatch):
    """Canary keys in the environment and in a manifest URL: none appears in the lake (tables,
    rejected, summaries, cache) or in what the job printed."""
    from tests.http_server import FaultServer

    canary = "CANARY7f3a9c1e"
    monkeypatch.setenv("AWS_SESSION_TOKEN", f"{canary}-token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", f"/secrets/{canary}.json")
    server = FaultServer({"a.jpg": photos[0].read_bytes()}).start()
    try:
        host = server.url.split("://", 1)[1]
        rows = [{"post_id": "u", "image": f"http://user:{canary}@{host}/img/a.jpg"},
                {"post_id": "v", "image": f"http://user:{canary}@{host}/status/404/x"}]
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lake = tmp_path / "lake"
        capfd.readouterr()
        assert ingest(lake, tmp_path / "m.jsonl", "manifest", "ingest.http.allow_private=true") == 0
        out = capfd.readouterr()
        assert server.credentials_seen == 0
    finally:
        server.stop()
    assert set(_posts(spark, lake)) == {"u"} and _posts(spark, lake)["u"]["image_uri"] == f"http://{host}/img/a.jpg"
    leaked = [str(f) for f in lake.rglob("*") if f.is_file() and canary.encode() in f.read_bytes()]
    assert leaked == [] and canary not in out.out and canary not in out.err


# ---------------------------------------------------------------- 9: stale inputs


def test_a_stage_refuses_an_input_made_from_an_older_input(spark, tmp_path, photos, capsys):
    for i in range(6):
        shutil.copyfile(photos[i], tmp_path / f"{i}.jpg")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"post_id": str(i), "image": f"{i}.jpg"}) + "\n" for i in range(3)))
    second.write_text("".join(json.dumps({"post_id": str(i), "image": f"{i}.jpg"}) + "\n" for i in range(3, 6)))
    lake = tmp_path / "lake"
    assert ingest(lake, first) == 0
    assert run_job("prepare_images", "--set", f"lake={lake}") == 0
    assert ingest(lake, second) == 0  # new posts: the images table is now from the old ones
    capsys.readouterr()
    assert run_job("dedup", "--set", f"lake={lake}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tables/images is stale" in err[0] and "prepare_images.py again" in err[0], err
    # moving the lake keeps its links (inputs are named relative to the output)
    moved = tmp_path / "moved"
    shutil.move(str(lake), str(moved))
    assert run_job("prepare_images", "--set", f"lake={moved}") == 0
    assert run_job("dedup", "--set", f"lake={moved}") == 0
    assert read_summary(spark, Lake(str(moved)).table("images"))["inputs"] == {"../posts": read_summary(
        spark, Lake(str(moved)).table("posts"))["run_id"]}


# ---------------------------------------------------------------- 6: a killed Python worker


def test_killed_python_worker_is_retried_with_identical_output(spark, prepared, tmp_path):
    """local[N, 4] (the default profile's master) retries a task whose Python worker died:
    prepare_images completes and writes the same images as a run left alone."""
    import psutil

    lake, _ = prepared
    work = tmp_path / "lake"
    shutil.copytree(Path(lake.table("posts")[len("file://"):]), work / "tables" / "posts")
    assert spark.sparkContext.master.replace(" ", "").endswith(",4]"), spark.sparkContext.master
    killed = []
    daemon = f"-m {spark.sparkContext.getConf().get('spark.python.daemon.module', 'pyspark.daemon')}"

    def killer():
        deadline = time.time() + 120
        me = psutil.Process()
        while time.time() < deadline and not killed:
            for p in me.children(recursive=True):
                try:  # a worker: a process the daemon forked (both show the daemon's command line)
                    if daemon in " ".join(p.cmdline()) and p.parent() and daemon in " ".join(p.parent().cmdline()):
                        time.sleep(1.0)  # let it start on its rows
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    assert run_job("prepare_images", "--set", f"lake={work}") == 0
    t.join(5)
    assert killed, "no Python worker was seen to kill"
    ours = spark.read.parquet(Lake(str(work)).table("images")).select("post_id", "image").toPandas()
    ref = spark.read.parquet(lake.table("images")).select("post_id", "image").toPandas()
    assert ours.sort_values("post_id").reset_index(drop=True).equals(ref.sort_values("post_id").reset_index(drop=True))


# ---------------------------------------------------------------- a killed driver


@pytest.mark.slow
def test_driver_killed_mid_write_leaves_nothing_that_looks_complete(spark, sample, prepared, tmp_path, capsys):
    import subprocess
    import sys

    from core.lake import SUMMARY_FILE
    from sparkml.sample.make_sample import MANIFEST

    root, _ = sample
    lake = tmp_path / "lake"
    sets = [f"lake={lake}", f"source.path={root / MANIFEST}", "source.layout=manifest", "spark.master=local[1]"]
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "ingest.py"), "--config", str(ROOT / "conf" / "local.yaml"),
                            *[a for s in sets for a in ("--set", s)]], env={**os.environ, "PYTHONPATH": str(ROOT)},
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    posts = lake / "tables" / "posts"
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and not (posts / "_temporary").exists():
        time.sleep(0.02)
    assert job.poll() is None, "ingest ended before its write could be interrupted"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)
    assert not (posts / SUMMARY_FILE).exists()
    capsys.readouterr()
    assert run_job("prepare_images", "--set", f"lake={lake}") == 2
    assert "tables/posts is missing or incomplete: run jobs/ingest.py first" in capsys.readouterr().err
    # the re-run writes what an uninterrupted run writes
    assert run_job("ingest", *[a for s in sets[:3] for a in ("--set", s)]) == 0
    ref_lake, _ = prepared
    cols = ["post_id", "caption", "image_bytes"]
    got = spark.read.parquet(str(posts)).select(*cols).toPandas().sort_values("post_id").reset_index(drop=True)
    ref = spark.read.parquet(ref_lake.table("posts")).select(*cols).toPandas().sort_values("post_id").reset_index(drop=True)
    assert got.equals(ref)


# ---------------------------------------------------------------- two runs at once


@pytest.mark.slow
def test_a_second_run_on_the_same_output_refuses(spark, sample, tmp_path, capsys):
    import subprocess
    import sys

    from core.lake import SUMMARY_FILE
    from sparkml.sample.make_sample import MANIFEST

    root, _ = sample
    lake = tmp_path / "lake"
    sets = [f"lake={lake}", f"source.path={root / MANIFEST}", "source.layout=manifest"]
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "ingest.py"), "--config", str(ROOT / "conf" / "local.yaml"),
                            *[a for s in sets + ["spark.master=local[1]"] for a in ("--set", s)]],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = lake / "tables" / ".posts.lock"
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    assert job.poll() is None, job.stderr.read().decode()[-2000:]
    capsys.readouterr()
    assert run_job("ingest", *[a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert "is being written by another run right now" in err and f"pid {job.pid}" in err
    assert job.wait(300) == 0  # the first run was not disturbed
    s = read_summary(spark, Lake(str(lake)).table("posts"))
    assert s["balanced"] and (lake / "tables" / "posts" / SUMMARY_FILE).exists()
    assert run_job("ingest", *[a for s in sets for a in ("--set", s)]) == 0  # free again once it ended
