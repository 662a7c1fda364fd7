import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import Sample
from core.schemas import CAP_DIR, IMG_DIR
from core.schemas import CITIES
from sparkml.sample.make_sample import GROUND_TRUTH, MANIFEST, generate
from tests.conftest import planted


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = Sample(out=str(tmp_path / "a"), posts=60, seed=3, size=96, workers=1)
    generate(a)
    generate(a.model_copy(update={"out": str(tmp_path / "b"), "workers": 2}))
    generate(a.model_copy(update={"out": str(tmp_path / "c"), "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    try:
        generate(Sample(out=str(tmp_path), posts=60, seed=1, size=64, workers=1))
    except FileExistsError:
        pass
    else:
        raise AssertionError("generator overwrote a foreign folder")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _image(root: Path, truth: dict, pid: str) -> Path:
    (path,) = list((root / IMG_DIR).glob(f"*/{pid}.*"))
    return path


def test_planted_cases_are_what_they_claim(sample):
    root, truth = sample
    assert json.loads((root / GROUND_TRUTH).read_text())["planted"] == truth["planted"]
    for case in planted(truth, "truncated"):
        data = _image(root, truth, case["post_id"]).read_bytes()
        assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
    for case in planted(truth, "zero_byte"):
        assert _image(root, truth, case["post_id"]).stat().st_size == 0
    for case in planted(truth, "cmyk"):
        assert Image.open(_image(root, truth, case["post_id"])).mode == "CMYK"
    for case in planted(truth, "grayscale"):
        assert Image.open(_image(root, truth, case["post_id"])).mode == "L"
    for case in planted(truth, "exif_rotated"):
        img = Image.open(_image(root, truth, case["post_id"]))
        assert img.getexif()[0x0112] == 6
        assert list(img.size) == case["displayed_size"][::-1]
    for kind, fmt in (("png", "PNG"), ("png_as_jpg", "PNG"), ("gif", "GIF"), ("webp", "WEBP")):
        for case in planted(truth, kind):
            assert Image.open(_image(root, truth, case["post_id"])).format == fmt
    (bomb,) = planted(truth, "decompression_bomb")
    data = _image(root, truth, bomb["post_id"]).read_bytes()
    assert len(data) < 2_000_000 and int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big") == 400_000_000
    for case in planted(truth, "exact_duplicate"):
        assert _image(root, truth, case["post_id"]).read_bytes() == _image(root, truth, case["of"]).read_bytes()
    def thumb(pid):
        return np.asarray(Image.open(_image(root, truth, pid)).convert("L").resize((16, 16)), np.float32)

    others = [pid for pid in sorted(truth["labels"])[:40] if pid not in {c["post_id"] for c in truth["planted"]}]
    for case in planted(truth, "near_duplicate"):
        assert _image(root, truth, case["post_id"]).read_bytes() != _image(root, truth, case["of"]).read_bytes()
        near = np.abs(thumb(case["post_id"]) - thumb(case["of"])).mean()
        # the same picture re-encoded/resized/cropped: closer to its source than to any other post
        assert near < min(np.abs(thumb(o) - thumb(case["of"])).mean() for o in others if o != case["of"])
    for case in planted(truth, "caption_not_utf8"):
        raw = next((root / CAP_DIR).glob(f"*/{case['post_id']}.txt")).read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise AssertionError("planted caption decodes as UTF-8")
    for case in planted(truth, "caption_missing"):
        assert not list((root / CAP_DIR).glob(f"*/{case['post_id']}.txt"))
    for case in planted(truth, "image_missing"):
        assert not list((root / IMG_DIR).glob(f"*/{case['post_id']}.*"))
        assert list((root / CAP_DIR).glob(f"*/{case['post_id']}.txt"))
    (dup,) = planted(truth, "duplicate_post")
    assert len(list((root / IMG_DIR).glob(f"*/{dup['post_id']}.*"))) == 2


def test_file_counts_match_ground_truth(sample):
    root, truth = sample
    assert sum(1 for p in (root / IMG_DIR).rglob("*") if p.is_file()) == truth["image_files"]
    assert sum(1 for p in (root / CAP_DIR).rglob("*") if p.is_file()) == truth["caption_files"]
    rows = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    assert len(rows) == truth["manifest_rows"]
    me = truth["me"]
    assert {r.get("city") for r in rows if r["post_id"] not in me} == set(CITIES)
    assert all("city" not in r for r in rows if r["post_id"] in me) and len(me) == 80
    assert sum(1 for p in (root / "me").glob("*.jpg")) == len(me)
    followers = [r.get("followers") for r in rows if r["post_id"]]
    assert None in followers and -5 in followers and 0 in followers
    assert max(f for f in followers if f is not None) > 100 * np.median([f for f in followers if f is not None])


def test_cities_are_learnable_from_pixels_and_captions(sample):
    """A nearest-centroid classifier on 8x8 thumbnails beats chance (10%) by far."""
    root, truth = sample
    labels = truth["labels"]
    broken = {c["post_id"] for c in truth["planted"]}
    feats, ys = [], []
    for pid, lab in sorted(labels.items()):
        if pid in broken:
            continue
        img = Image.open(_image(root, truth, pid)).convert("RGB").resize((8, 8))
        feats.append(np.asarray(img, np.float32).ravel() / 255)
        ys.append(CITIES.index(lab["city"]))
    x, y = np.array(feats), np.array(ys)
    train = np.arange(len(y)) % 3 != 0
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(len(CITIES))])
    pred = np.argmin(((x[~train, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[~train]).mean() > 0.25  # chance is 0.10
    rows = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    named = [r["city"] in (r.get("caption") or "").lower() for r in rows if r.get("city")]
    assert 0.6 < np.mean(named) < 0.9  # most captions name the city, not all


def test_me_posts_plant_faces_memes_and_a_learnable_like_ratio(sample):
    """The '#me' ground truth is what the files and the manifest hold: a face where the box says
    (brighter skin inside an ellipse of hair), none in memes, and likes/followers that follow the
    planted factors."""
    root, truth = sample
    me = truth["me"]
    rows = {r["post_id"]: r for r in map(json.loads, (root / MANIFEST).read_text().splitlines()) if r["post_id"] in me}
    kinds = [m["kind"] for m in me.values()]
    assert 0.7 < kinds.count("selfie") / len(kinds) < 0.98 and "meme" in kinds
    ratio = {pid: rows[pid]["likes"] / rows[pid]["followers"] for pid in me}
    log_r = np.log([ratio[p] for p in me])
    log_a = np.log([me[p]["appeal"] for p in me])
    assert np.corrcoef(log_r, log_a)[0, 1] > 0.6  # the planted link: noise sd 0.35 against factors of 1.6-1.8
    for group in (lambda m: m["close"], lambda m: m["green"]):
        on = [np.log(ratio[p]) for p, m in me.items() if m["kind"] == "selfie" and group(m)]
        off = [np.log(ratio[p]) for p, m in me.items() if m["kind"] == "selfie" and not group(m)]
        assert np.mean(on) - np.mean(off) > 0.3
    for pid, m in me.items():
        assert m["image_rel"] == rows[pid]["image"]
        img = np.asarray(Image.open(root / m["image_rel"]).convert("RGB"), np.float32)
        assert img.shape[:2] == (m["size"], m["size"])
        if m["kind"] == "selfie":
            x, y, w, h = (int(v) for v in m["box"])
            assert 0 <= x and 0 <= y and x + w <= m["size"] and y + h <= m["size"]
            assert (w > 0.25 * m["size"]) == m["close"]
