"""Explore a personal archive (the original's experiment 4): features of every image (VGG19
fc7 by default, or raw pixels at 150x150 with explore.features=pixels), Spark ML K-Means
for each k of explore.k_range with its silhouette, the clusters of explore.k (10) in
<lake>/tables/clusters, a 2-D t-SNE map of thumbnails coloured by cluster, a contact sheet
per cluster and, with explore.weights=imagenet, each cluster's most frequent ImageNet
classes; all under <lake>/reports/explore/.

The archive is an images table: ingest it with source.layout=instagram (an Instagram "Download
your information" export) or folder, run prepare_images, and point explore.images at it (or
use that run's lake).

    spark-submit jobs/ingest.py --set lake=./data/archive --set source.layout=instagram \\
        --set source.path=./my-instagram-export
    spark-submit jobs/prepare_images.py --set lake=./data/archive
    spark-submit jobs/explore.py --set lake=./data/archive
"""

import sys

from core import cli


def main(argv=None) -> int:
    def body(spark, cfg, args):
        from sparkml.explore import explore

        return explore(spark, cfg)

    return cli.run("explore", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
