"""The original's retrieval evaluation: for each city name as the query (newyork,
losangeles, ...), rank the test images (same hash split as build_dataset) by similarity to
the query's topic vector; precision at 100 and non-interpolated average precision over the
full ranking, relevant = a test image of that city; per city and mean, next to the
published figures (mean P@100 90.2, mean AP 18.96). Writes
<lake>/reports/retrieval_eval/metrics.{json,md}.

    spark-submit jobs/evaluate_retrieval.py --config conf/local.yaml --set retrieval.metric=cosine
"""

import sys

from core import cli
from sparkml.captions.retrieval import evaluate


def main(argv=None) -> int:
    return cli.run("evaluate_retrieval", __doc__, lambda spark, cfg, args: evaluate(spark, cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
