"""Build a Petastorm training dataset: unique images (images minus duplicates) with their
labels -> <lake>/datasets/<dataset.name>/{train,val,test}.

Split deterministically by a hash of post_id (dataset.train / dataset.val / rest test,
default 80/5/15 like InstaCities1M's 800K/50K/150K), or the source's split where it gave
one. Row groups are sized so every one of dataset.ranks training ranks gets at least
dataset.row_groups_per_rank of them. Readable with petastorm.make_reader and with plain
Spark/pyarrow. Posts without a label go to the rejected table (no_label).

    spark-submit jobs/build_dataset.py --config conf/local.yaml --set dataset.ranks=4
"""

import sys

from core import cli
from sparkml.cnn.build_dataset import build_dataset


def main(argv=None) -> int:
    return cli.run("build_dataset", __doc__, lambda spark, cfg, args: build_dataset(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
