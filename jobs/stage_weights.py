"""Stage pretrained weights with their card (dl.weights) where the stages read them: the file
is copied to --to, its card written beside it, and both loaded back once.

--from auto (the default) takes the project's shipped file ../shared/data/weights/<model>_imagenet.pth
when it is there (MobileNetV2 and SqueezeNet 1.0: real ImageNet weights whose cards are in
conf/weights/), else torchvision's ImageNet weights of the model (`imagenet`: TORCH_HOME, or a
download). It says in one line which it staged. Plain Python, no Spark: `make demo` runs it first.

    python jobs/stage_weights.py --model mobilenet_v2 --to ./data/weights
    python jobs/stage_weights.py --from ./alexnet-owt.pth --model alexnet --to s3://b/weights \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --categories imagenet
"""

import sys
from pathlib import Path

from core import cli

SHIPPED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights"


def _options(p) -> None:
    from dl.weights import _triple

    p.add_argument("--from", dest="source", default="auto",
                   help="auto (the shipped file when there, else imagenet), imagenet, or a state_dict file / URI")
    p.add_argument("--model", default="mobilenet_v2", help="torchvision architecture (default mobilenet_v2)")
    p.add_argument("--to", dest="dest", default="./data/weights", help="folder URI (local, s3://, gs://)")
    p.add_argument("--name", help="file name without extension (default: the model's name)")
    p.add_argument("--mean", type=_triple, help="R,G,B mean of x/255 (files conf/weights/ does not know)")
    p.add_argument("--std", type=_triple, help="R,G,B std")
    p.add_argument("--categories", choices=["imagenet"], help="the head predicts torchvision's 1000 classes")
    p.add_argument("--batchnorm", choices=["trained", "folded"], help="batch norm folded into the convolutions")


def main(argv=None) -> int:
    cfg, args = cli.parse("stage_weights", __doc__, argv, _options)
    from dl.weights import WeightsError, describe, stage

    source = args.source
    if source == "auto":
        shipped = SHIPPED / f"{args.model}_imagenet.pth"
        source = str(shipped) if shipped.is_file() else "imagenet"
    try:
        uri, card = stage(source, args.dest, model=args.model, name=args.name or args.model, mean=args.mean,
                          std=args.std, categories=args.categories, batchnorm=args.batchnorm,
                          endpoint=cfg.s3.endpoint, region=cfg.s3.region)
    except WeightsError as e:
        print(f"stage_weights.py: error: {e}", file=sys.stderr)
        return 2
    which = "the shipped file" if source.startswith(str(SHIPPED)) else ("torchvision's imagenet weights"
                                                                        if source == "imagenet" else source)
    print(f"stage_weights: {args.model} weights: {which} -> {uri} ({describe(card)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
