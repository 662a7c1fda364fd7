"""Face detection benchmark (issue 4): images/s per core and precision / recall / false-positive
rate on labelled real photos, per detector and detection size, against the original study's
baseline measured in the same run: OpenCV's Haar cascade with default detectMultiScale
parameters on the full-size image.

Labelled sets:
- real: ../shared/data/realsample faces/ (12 photos with faces) and nonfaces/ (12 Instagram
  photos without), scikit-image's astronaut and camera (faces) and coffee, chelsea, rocket,
  hubble, immunohistochemistry, horse, clock, coins, moon, retina, brick, grass, gravel
  (no human face);
- lfw: scikit-image's lfw_subset (100 face crops, 100 non-face crops, 25x25 gray), upscaled
  to 100 px and padded to 160 px so a detector sees a face in context, reported apart.

    .venv/bin/python bench/faces.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import REALSAMPLE, header, single_core

import cv2  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from sparkml.images.resize import prepare_image  # noqa: E402
from sparkml.likability.detect_faces import make_detector  # noqa: E402


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:  # horse is boolean
        a = (a.astype(np.float64) / (a.max() or 1) * 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])


def real_set() -> list[tuple[str, np.ndarray, bool]]:
    out = [(p.name, np.asarray(Image.open(p).convert("RGB")), True) for p in sorted((REALSAMPLE / "faces").glob("*.jpg"))]
    out += [(p.name, np.asarray(Image.open(p).convert("RGB")), False)
            for p in sorted((REALSAMPLE / "nonfaces").glob("*.jpg"))]
    for name, face in (("astronaut", True), ("camera", True), ("coffee", False), ("chelsea", False), ("rocket", False),
                       ("hubble_deep_field", False), ("immunohistochemistry", False), ("horse", False), ("clock", False),
                       ("coins", False), ("moon", False), ("retina", False),
                       ("brick", False), ("grass", False), ("gravel", False)):
        out.append((name, _rgb(getattr(data, name)()), face))
    return out


def lfw_set() -> list[tuple[str, np.ndarray, bool]]:
    imgs = data.lfw_subset()  # 200 x 25 x 25 floats: the first 100 faces, the last 100 not
    out = []
    for i, im in enumerate(imgs):
        a = cv2.resize((im * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        a = cv2.copyMakeBorder(a, 30, 30, 30, 30, cv2.BORDER_REPLICATE)
        out.append((f"lfw{i:03d}", _rgb(a), i < 100))
    return out


def squash300(rgb: np.ndarray) -> np.ndarray:
    """What detect_faces sees: the prepared 300x300 image (prepare_images' squash)."""
    buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    out = prepare_image(buf, size=300)
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(out.image, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def evaluate(name: str, det, items, threshold: float, repeat: int, baseline_rate: float | None = None) -> dict:
    scores, best = [], float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        scores = [max((b[4] for b in det.detect(img)), default=0.0) for _, img, _ in items]
        best = min(best, time.perf_counter() - t0)
    truth = np.array([f for _, _, f in items])
    pred = np.array(scores) > 0 if threshold is None else np.array(scores) >= threshold
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    row = {"name": name, "detector": det.name, "params": det.params, "threshold": threshold,
           "img_s": len(items) / best, "recall": tp / max(1, truth.sum()), "fpr": fp / max(1, (~truth).sum()),
           "precision": tp / max(1, tp + fp), "faces": int(truth.sum()), "nonfaces": int((~truth).sum()),
           "missed": [n for (n, _, f), p in zip(items, pred) if f and not p],
           "false_positives": [n for (n, _, f), p in zip(items, pred) if p and not f]}
    speed = f" ({row['img_s'] / baseline_rate:.1f}x baseline)" if baseline_rate else ""
    print(f"  {name:34s} {row['img_s']:7.1f} img/s{speed:18s} recall {row['recall']:.2f}  FPR {row['fpr']:.2f}  "
          f"precision {row['precision']:.2f}  (threshold {'any face' if threshold is None else threshold})")
    return row


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def sample_set(threshold: float) -> dict:
    """Recall on the sample's planted faces and false positives on its face-free images."""
    from _common import CACHE

    from core.config import Sample
    from core.schemas import IMG_DIR
    from sparkml.images.resize import prepare_image
    from sparkml.sample.make_sample import generate

    out = CACHE / "faces-sample"
    truth = generate(Sample(out=str(out), posts=300, me_posts=600, seed=7, workers=2))
    det = make_detector("cnn", max_side=200)
    haar = make_detector("haar", max_side=200)
    rows = {"cnn at 200 px": {"hit": 0, "fp": 0}, "haar at 200 px (any face)": {"hit": 0, "fp": 0}}
    n_faces = n_free = 0
    scenes = sorted((out / IMG_DIR).glob("*/*.jpg"))[:300]
    items = [(out / m["image_rel"], m) for m in truth["me"].values()] + [(p, None) for p in scenes]
    for path, m in items:
        prep = prepare_image(path.read_bytes())
        if not hasattr(prep, "image"):
            continue
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(prep.image, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        face = m is not None and m["kind"] == "selfie"
        want = [v * 300 / m["size"] for v in m["box"]] if face else None
        n_faces += face
        n_free += not face
        for name, d, t in (("cnn at 200 px", det, threshold), ("haar at 200 px (any face)", haar, 0.0)):
            boxes = [b for b in d.detect(rgb) if b[4] >= t]
            if face:
                rows[name]["hit"] += any(_iou(b[:4], want) >= 0.3 for b in boxes)
            else:
                rows[name]["fp"] += bool(boxes)
    print(f"\nsample: {n_faces} planted faces ('#me' selfies), {n_free} face-free images (quotes, city scenes)")
    for name, r in rows.items():
        r.update(recall=r["hit"] / n_faces, fpr=r["fp"] / n_free)
        print(f"  {name:28s} recall {r['recall']:.3f}  FPR {r['fpr']:.3f}  (threshold {threshold if 'cnn' in name else 'any'})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.8, help="cnn confidence threshold (faces.min_confidence)")
    ap.add_argument("--sample-only", action="store_true", help="only the generated sample's planted faces")
    args = ap.parse_args()
    if args.sample_only:
        header("face detection: the generated sample's planted faces")
        print(json.dumps(sample_set(args.threshold), indent=1))
        return
    header("face detection: speed per core and quality on labelled real photos")
    single_core()
    results = {}
    for set_name, items in (("real", real_set()), ("lfw", lfw_set())):
        n_f = sum(f for _, _, f in items)
        print(f"\n{set_name}: {n_f} with faces, {len(items) - n_f} without")
        rows = [evaluate("haar default, full size (baseline)", make_detector("haar", max_side=None), items, None,
                         args.repeat)]
        base = rows[0]["img_s"]
        for side in (320, 200, 160, 120):
            rows.append(evaluate(f"cnn (libfacedetection) at {side} px", make_detector("cnn", max_side=side), items,
                                 args.threshold, args.repeat, base))
        rows.append(evaluate("cnn full size", make_detector("cnn", max_side=None), items, args.threshold,
                             args.repeat, base))
        rows.append(evaluate("haar at 200 px", make_detector("haar", max_side=200), items, None, args.repeat, base))
        prepared = [(n, squash300(img), f) for n, img, f in items]
        rows.append(evaluate("pipeline: prepared 300x300 -> cnn 200", make_detector("cnn", max_side=200), prepared,
                             args.threshold, args.repeat, base))
        # The threshold: what each choice gives for the default detector.
        det = make_detector("cnn", max_side=200)
        sc = np.array([max((b[4] for b in det.detect(img)), default=0.0) for _, img, _ in items])
        truth = np.array([f for _, _, f in items])
        sweep = {t: {"recall": float(((sc >= t) & truth).sum() / truth.sum()),
                     "fpr": float(((sc >= t) & ~truth).sum() / (~truth).sum())} for t in (0.5, 0.7, 0.8, 0.9, 0.95)}
        print("  cnn at 200 px, threshold sweep: " + ", ".join(
            f"{t}: recall {v['recall']:.2f} FPR {v['fpr']:.2f}" for t, v in sweep.items()))
        results[set_name] = {"rows": rows, "sweep": sweep}
    results["sample"] = sample_set(args.threshold)
    print("\n" + json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
