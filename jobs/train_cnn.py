"""Fine-tune a CNN on a Petastorm dataset with distributed PyTorch, launched by Spark:
--task city (AlexNet, 10 cities), topics (GoogLeNet regressing the caption topics) or
likability (AlexNet, good/bad selfies). The recipe comes from a preset, conf/train/<task>.yaml
(the original's, for weights: imagenet) unless --preset names another (city-scratch,
topics-scratch, likability-scratch: random weights, all layers trained with Adam); every key
can be overridden with --set train.<key>=...

Processes (train.processes) run under TorchDistributor: train.mode=local starts them on the
driver (one node: one per GPU, or CPU processes), cluster as barrier tasks on the executors
(dynamic allocation must be off), inline runs one process in this one. Checkpoints go to
<lake>/checkpoints/train_<task>/ every train.checkpoint_every iterations and at each epoch end;
--resume continues the last run exactly. The best epoch by validation is exported to
<lake>/models/<task>/ (model.pt, model.json: preprocessing and label names) and the report to
<lake>/reports/train_<task>/ (metrics.json/.md, curve.png, tensorboard/).

    spark-submit jobs/train_cnn.py --config conf/local.yaml --task city --preset city-scratch
    spark-submit jobs/train_cnn.py --config conf/emr.yaml --task topics --set train.processes=8 \\
        --set train.mode=cluster
"""

import sys

from core import cli


def _arguments(p):
    p.add_argument("--task", choices=["city", "topics", "likability"], required=True, help="what to learn")
    p.add_argument("--preset", default=None,
                   help="conf/train/<preset>.yaml or a YAML path (default: the task's, the original's recipe)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint of the last run with the same settings")


def _preset(args):
    from sparkml.cnn.train_cnn import preset

    return preset(args.task, args.preset)


def main(argv=None) -> int:
    def body(spark, cfg, args):
        from sparkml.cnn.train_cnn import train_cnn

        return train_cnn(spark, cfg, args.resume)

    return cli.run("train_cnn", __doc__, body, argv, _arguments, _preset)


if __name__ == "__main__":
    sys.exit(main())
