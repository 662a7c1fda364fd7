"""Text-to-image retrieval: rank unique images for each query by similarity of the query's
topic vector (mean of its words' p(word | topic), words preprocessed like captions) to the
image embeddings (retrieval.embeddings, default the captions' own topic vectors from
infer_topics; the GoogLeNet regressor's predictions once it exists). Block-wise top-k on
executors. Writes <lake>/tables/retrieval (query, rank, post_id, score) and a contact sheet
PNG per query under <lake>/reports/retrieval/. A query with no known word exits 2.

    spark-submit jobs/retrieve.py --config conf/local.yaml --query "skyline night" --k 20
"""

import argparse
import sys

from core import cli
from sparkml.captions.retrieval import retrieve


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def _args(p):
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("--k", type=_positive, default=None, help="images per query (default retrieval.k)")


def main(argv=None) -> int:
    return cli.run("retrieve", __doc__, lambda spark, cfg, args: retrieve(spark, cfg, args.query, args.k), argv,
                   add_arguments=_args)


if __name__ == "__main__":
    sys.exit(main())
