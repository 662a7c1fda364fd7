"""Topic distribution of every caption: <lake>/tables/bow + models/lda ->
<lake>/tables/topics (post_id, topics float[num_topics], the full distribution).

The model is broadcast to executors and applied one Arrow batch at a time. Posts whose
caption had no vocabulary word have no bag of words and get no topic vector (train_lda
counted and rejected them).

    spark-submit jobs/infer_topics.py --config conf/local.yaml
"""

import sys

from core import cli
from sparkml.captions.topics import infer_topics


def main(argv=None) -> int:
    return cli.run("infer_topics", __doc__, lambda spark, cfg, args: infer_topics(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
