"""Prepare images: posts -> <lake>/tables/images.

Per post: decode safely (decompression bombs, truncated and non-image data are rejected
with a reason; PNG/GIF/WebP/CMYK/grayscale are accepted; EXIF orientation is applied),
resize to prepare.size (policy squash or crop), re-encode JPEG at prepare.quality, and
hash: SHA-256 of the original bytes and a 64-bit DCT pHash of the result. Original
width/height (as displayed) are kept. Rejects go to <lake>/tables/rejected/stage=prepare_images.

    spark-submit jobs/prepare_images.py --config conf/local.yaml --set prepare.policy=crop
"""

import sys

from core import cli
from sparkml.images.prepare_images import prepare_images


def main(argv=None) -> int:
    return cli.run("prepare_images", __doc__, lambda spark, cfg, args: prepare_images(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
