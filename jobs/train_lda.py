"""Train caption topics: posts -> <lake>/tables/bow + <lake>/models/lda.

Captions are preprocessed on executors exactly as the original (see sparkml/captions/text.py);
Spark counts tokens and keeps those seen more than lda.min_count times (optionally the
lda.max_vocab most frequent), writes each caption's bag of words (partitioned by the
dataset split), then gensim trains LDA on the train split streaming from Parquet (the
corpus is never held in memory). The summary has the held-out log perplexity (val split)
and the u_mass topic coherence. Captions with no words left go to the rejected table.

    spark-submit jobs/train_lda.py --config conf/local.yaml --set lda.num_topics=500 --set lda.min_count=150
"""

import sys

from core import cli
from sparkml.captions.topics import train_lda


def main(argv=None) -> int:
    return cli.run("train_lda", __doc__, lambda spark, cfg, args: train_lda(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
