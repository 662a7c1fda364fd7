"""Write one static HTML report of what this run produced: <lake>/reports/index.html, with
its pictures beside it (reports/report_files/ and the stages' own PNGs), relative links only,
no JavaScript: it opens from a laptop or an S3 / GCS static website.

Sections, each present when its stage ran (the others are listed as not run): dataset
accounting (inputs, kept, duplicates, rejected by reason, rejected and duplicate examples),
the city classifier (per-city accuracy beside the published figures, confusion matrix,
training curves), retrieval (P@100 / AP per city beside the published 90.2 / 18.96, contact
sheets for the original's queries), likability (the AP table beside the published one, the
top and bottom 25 test images), the archive exploration (silhouettes, t-SNE map, clusters)
and batch scoring.

    spark-submit jobs/report.py --config conf/local.yaml
"""

import sys

from core import cli


def main(argv=None) -> int:
    def body(spark, cfg, args):
        from sparkml.report import write_report

        return write_report(spark, cfg)

    return cli.run("report", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
