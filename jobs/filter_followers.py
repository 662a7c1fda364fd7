"""Likability labels: posts -> <lake>/tables/likability_labels (post_id, user_id, likes,
followers, ratio, bucket, label).

Users whose follower count is far from the median (|x - median| <= followers.k * MAD over
users, optionally on ln(followers)) are dropped: celebrities and near-empty accounts. Posts
younger than followers.min_age_days are dropped (likes need time). ratio = likes /
followers; label 1 above the median ratio of the kept images (or of their follower bucket
with followers.label_by=buckets), else 0. Posts without a user, with missing, zero or
negative followers or invalid likes go to the rejected table with the reason.

    spark-submit jobs/filter_followers.py --config conf/local.yaml --set followers.log_scale=true
"""

import sys

from core import cli
from sparkml.likability.filter_followers import filter_followers


def main(argv=None) -> int:
    return cli.run("filter_followers", __doc__, lambda spark, cfg, args: filter_followers(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
