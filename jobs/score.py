"""Score new images with the models this run trained: <lake>/tables/scores, one row per image
and model (post_id, model, version, city + city_probs, topics, likability_score +
likability_prob; docs/architecture.md has the contract).

score.input is a folder of images (score.layout=folder, the default), a manifest, an
Instagram export, InstaCities folders, or an images table (score.layout=images). New images
go through ingest's checks and prepare_images' decode and resize, as training data did;
those that fail go to <lake>/tables/rejected/stage=score with the reason. Models
(score.models): the exported CNNs of train_cnn (models/city, models/topics,
models/likability) and the best Spark SVM of train_svm over features extracted on the fly
with the network in features.*; a model not trained is skipped and named in the summary.
A model trained on other preprocessing (prepare.size) or other labels exits 2.

    spark-submit jobs/score.py --config conf/local.yaml --set score.input=./new_photos
    spark-submit jobs/score.py --config conf/emr.yaml --set score.input=s3://bucket/incoming.csv \\
        --set score.layout=manifest
"""

import sys

from core import cli


def main(argv=None) -> int:
    def body(spark, cfg, args):
        from sparkml.score import score

        return score(spark, cfg)

    return cli.run("score", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
