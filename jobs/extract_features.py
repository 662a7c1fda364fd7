"""CNN features of a Petastorm dataset's images: <lake>/datasets/<features.dataset> ->
<lake>/tables/features (post_id, split, label, model, weights, layer, mirrored, vector float32[dim]),
one row per image, layer and (with features.mirror) mirroring. An image that does not decode
goes to the rejected table.

features.model is a torchvision model (alexnet by default), features.weights none (random
init from features.seed, for tests and the demo: it shows the pipeline, not ImageNet
quality), imagenet (needs internet on the cluster) or a checkpoint URI; features.layers fc6,
fc7 (after their ReLU, as Caffe's) or prelogit.

    spark-submit jobs/extract_features.py --config conf/local.yaml --set features.layers=[fc7]
"""

import sys

from core import cli
from sparkml.extract_features import extract_features


def main(argv=None) -> int:
    return cli.run("extract_features", __doc__, lambda spark, cfg, args: extract_features(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
