"""Likability classifiers on CNN features: <lake>/tables/features ->
<lake>/reports/likability_svm/metrics.{json,md} (the original's average-precision table with
our figures beside) and <lake>/models/likability_svm/<layer>_<variant>/ (Spark ML
PipelineModels; _SUMMARY.json names the best by validation).

Per layer (svm.layers) and variant (normal; flipped+normal when the features include mirrored
images): Spark ML StandardScaler + LinearSVC tuned by CrossValidator over svm.c_grid
(regParam = 1 / (C n)), MLlib SVMWithSGD (normal), and on the driver scikit-learn LinearSVC and
RandomForest(500) when the training rows fit under svm.driver_max_rows. Training uses the train
and val splits, figures the test split. One class in the training rows exits 2.

    spark-submit jobs/train_svm.py --config conf/local.yaml --set svm.c_grid=[0.001,0.1,10]
"""

import sys

from core import cli
from sparkml.likability.train_svm import train_svm


def main(argv=None) -> int:
    return cli.run("train_svm", __doc__, lambda spark, cfg, args: train_svm(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
