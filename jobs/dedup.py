"""Find duplicate images: images -> <lake>/tables/duplicates (post_id, canonical_post_id,
kind exact|near, hamming).

Exact: same SHA-256 of the original bytes. Near: 64-bit pHash within dedup.max_hamming
bits, found by an exact multi-index search (dedup.bands bands; not all-pairs). One
canonical post is kept per group: the lowest post_id. Unique images = images minus
duplicates; input = unique + duplicates (by kind).

    spark-submit jobs/dedup.py --config conf/local.yaml --set dedup.max_hamming=6
"""

import sys

from core import cli
from sparkml.images.dedup import dedup


def main(argv=None) -> int:
    return cli.run("dedup", __doc__, lambda spark, cfg, args: dedup(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
