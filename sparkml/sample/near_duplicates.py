"""Near-duplicate test sets from real photos: each photo re-posted as people do (cropped,
re-encoded, rescaled, brighter or darker), with the ground truth of what copies what."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sparkml.sample.make_sample import GROUND_TRUTH, MANIFEST, encode_jpeg


EDITS = ("crop4", "crop5", "crop_asym", "reencode", "rescale", "bright")


def edited_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A re-post of img as people make them: cropped (4% or 5% per side, or each side 0-5% at
    random), re-encoded at JPEG quality 50-80, rescaled to 50-85%, or 20% brighter or darker."""
    w, h = img.size
    if kind.startswith("crop"):
        f = {"crop4": [0.04] * 4, "crop5": [0.05] * 4}.get(kind) or [float(x) for x in rng.uniform(0, 0.05, 4)]
        box = (round(w * f[0]), round(h * f[1]), w - round(w * f[2]), h - round(h * f[3]))
        return encode_jpeg(img.crop(box)), "crop l/t/r/b " + "/".join(f"{x:.1%}" for x in f)
    if kind == "reencode":
        q = int(rng.integers(50, 81))
        return encode_jpeg(img, q), f"jpeg quality {q}"
    if kind == "rescale":
        s = float(rng.uniform(0.5, 0.85))
        return encode_jpeg(img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR)), f"x{s:.2f}"
    if kind == "bright":
        from PIL import ImageEnhance

        b = float(rng.choice([0.8, 1.2]))
        return encode_jpeg(ImageEnhance.Brightness(img).enhance(b)), f"brightness x{b}"
    raise ValueError(f"unknown edit {kind!r}")


def write_near_duplicates(photos: list[Path], out: Path, seed: int = 0, kinds: tuple[str, ...] = EDITS) -> dict:
    """A manifest of real photos (originals re-encoded as they are) plus one edited copy of each
    per kind; returns the ground truth {post_id: {"of": original post_id or None, "kind", "detail"}}."""
    rng = np.random.default_rng(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    truth, rows = {}, []
    for i, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        src = f"p{i:04d}"
        items = [(src, "original", encode_jpeg(img), path.name)]
        items += [(f"{src}-{k}", k, *edited_copy(img, k, rng)) for k in kinds]
        for pid, kind, data, detail in items:
            (out / "img" / f"{pid}.jpg").write_bytes(data)
            rows.append({"post_id": pid, "image": f"img/{pid}.jpg"})
            truth[pid] = {"of": None if pid == src else src, "kind": kind, "detail": detail}
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / GROUND_TRUTH).write_text(json.dumps(truth, indent=1, sort_keys=True))
    return truth
