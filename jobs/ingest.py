"""Ingest posts into <lake>/tables/posts: post_id, city, caption (+ status), user fields,
image_uri and the original image bytes.

Reads source.path in the layout source.layout: `instacities` (InstaCities1M folders,
flat or train/val/test split, local or s3a://), `manifest` (CSV, JSON Lines or Parquet
with post_id, image and optional caption, city, user_id, likes, followers, posted_at),
`instagram` (an unzipped Instagram "Download your information" export in JSON format:
every image of every post, carousels included; captions repaired from the export's
mojibake; videos rejected) or `folder` (every image under a folder).
Rejected records (missing or empty images, duplicate posts, bad manifest rows, stray
files, videos) go to <lake>/tables/rejected/stage=ingest with a reason; input = output + rejected.

    spark-submit jobs/ingest.py --config conf/local.yaml
    python jobs/ingest.py --config conf/local.yaml --set source.layout=instacities --set source.path=./data/sample
    python jobs/ingest.py --set lake=./data/archive --set source.layout=instagram --set source.path=./my-instagram-export
"""

import sys

from core import cli
from sparkml.ingest.ingest import ingest


def main(argv=None) -> int:
    return cli.run("ingest", __doc__, lambda spark, cfg, args: ingest(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
