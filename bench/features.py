"""Feature extraction benchmark (issue 14): images/s per core of AlexNet fc7 end to end from a
Petastorm dataset's JPEG bytes (decode included) through sparkml.extract_features, against the naive
loop measured in the same run (one image at a time: PIL open -> torchvision's transform ->
forward at batch 1 -> numpy), as a fraction of the compute limit: the network's multiply-adds
per image and this machine's float32 GEMM rate, measured in the same run. Then the Spark job
(jobs/extract_features.py) on local[1] and local[2] over the demo's likability dataset.

Images: the dataset's `image` column when --dataset is given (the demo's, after `make demo`),
else the 396 real photos of ../shared/data/photos prepared as build_dataset stores them
(300 x 300 squash, JPEG q90).

    .venv/bin/python bench/features.py [--dataset data/lake/datasets/likability] [--no-spark]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
from _common import ROOT, header, single_core

import torch  # noqa: E402

from dl.models import load_model  # noqa: E402
from sparkml.extract_features import decode, extract, extractor# noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def dataset_jpegs(root: str | None, limit: int) -> list[bytes]:
    import pyarrow.parquet as pq

    if root:
        files = sorted(p for split in ("train", "val", "test") for p in (ROOT / root / split).glob("*.parquet"))
        out = [b for f in files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        return out[:limit]
    from sparkml.images.resize import prepare_image

    out = []
    for p in sorted(PHOTOS.glob("*.jpg"))[:limit]:
        out.append(prepare_image(p.read_bytes(), size=300, policy="squash", quality=90).image)
    return out


def gemm_gflops(n: int = 2048, repeat: int = 3) -> float:
    """float32 GEMM rate of this process (one thread): best of `repeat` n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def macs_per_image(net: torch.nn.Module) -> int:
    """Multiply-adds of one 224 x 224 image through the convolutions and linear layers that run."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return total


def ours(jpegs: list[bytes], batch: int, layers: tuple[str, ...]) -> float:
    """images/s: decode + batched preprocessing + one forward per batch (sparkml.extract_features)."""
    extract([decode(jpegs[0])] * batch, "alexnet", "none", layers, False)  # build the model, warm up at this size
    t0 = time.perf_counter()
    for i in range(0, len(jpegs), batch):
        extract([decode(b) for b in jpegs[i:i + batch]], "alexnet", "none", layers, False)
    return len(jpegs) / (time.perf_counter() - t0)


def forward_only(batch: int, layers: tuple[str, ...], repeat: int = 3) -> float:
    net, _ = extractor("alexnet", "none", layers)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(x)
        best = min(_time(lambda: net(x)) for _ in range(repeat))
    return batch / best


def naive(jpegs: list[bytes]) -> float:
    """images/s of the loop a first script would write: PIL -> transforms -> batch-1 forward."""
    import torchvision
    from PIL import Image

    net = load_model("alexnet", "none")
    fc7 = torch.nn.Sequential(net.features, net.avgpool, torch.nn.Flatten(1), *net.classifier[:6])
    transform = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    with torch.inference_mode():
        fc7(torch.zeros(1, 3, 224, 224))
        t0 = time.perf_counter()
        for b in jpegs:
            x = transform(Image.open(io.BytesIO(b)).convert("RGB"))
            fc7(x[None]).numpy()
    return len(jpegs) / (time.perf_counter() - t0)


def spark_job(master: str, lake: str, dataset: str) -> dict:
    """The extract_features job on `master`; its summary (images, seconds)."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    cmd = [sys.executable, str(ROOT / "jobs" / "extract_features.py"), "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"lake={lake}", "--set", f"spark.master={master}", "--set", f"features.dataset={dataset}"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return json.loads((ROOT / lake / "tables" / "features" / "_SUMMARY.json").read_text())


def udf_vs_map_in_arrow(dataset: str, rounds: int = 2) -> None:
    """predict_batch_udf (StructType return: fc6 and fc7 in one pass) against the job's
    mapInArrow adapter (sparkml.extract_features.extract_batch), on local[2], same rows, no mirroring,
    written to the noop sink; alternated, best of `rounds`."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from core.schemas import TABLES, with_reject
    from sparkml.extract_features import extract_batch

    os.environ.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    root = ROOT / dataset
    df = spark.read.parquet(*[str(root / sp) for sp in ("train", "val", "test")]).select(
        "post_id", F.lit("train").alias("split"), F.col("label").cast("int").alias("label"), "image").repartition(2).cache()
    n = df.count()

    def make_predict_fn():
        def predict(images: np.ndarray) -> dict:
            out = extract([decode(b) for b in images], "alexnet", "none", ("fc6", "fc7"), False)
            return {"fc6": out[("fc6", False)], "fc7": out[("fc7", False)]}
        return predict

    vec = T.ArrayType(T.FloatType())
    udf = predict_batch_udf(make_predict_fn, return_type=T.StructType([T.StructField("fc6", vec),
                                                                       T.StructField("fc7", vec)]), batch_size=64)
    ways = {
        "predict_batch_udf": lambda: df.select("post_id", udf("image").alias("f")).write.format("noop").mode(
            "overwrite").save(),
        "mapInArrow (the job's)": lambda: df.mapInArrow(
            lambda bs: (extract_batch(b, "alexnet", "none", ("fc6", "fc7"), False, 0) for b in bs),
            with_reject(TABLES["features"].schema)).write.format("noop").mode("overwrite").save(),
    }
    for fn in ways.values():  # start the workers and build their models
        fn()
    best = {k: min(_time(fn) for _ in range(rounds)) for k, fn in ways.items()}
    for k, v in best.items():
        print(f"{k:24s} local[2], fc6+fc7, {n} images: {n / v:.1f} images/s")
    spark.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", help="a Petastorm dataset folder (default: the real photos, prepared)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-spark", action="store_true", help="skip the local[1] / local[2] job runs")
    args = ap.parse_args()
    header("Feature extraction: AlexNet fc7, one core, float32")
    jpegs = dataset_jpegs(args.dataset, args.images)
    single_core()
    torch.set_num_threads(1)
    layers = ("fc7",)
    gflops = gemm_gflops()
    macs = macs_per_image(extractor("alexnet", "none", layers)[0])
    limit = gflops * 1e9 / (2 * macs)
    fwd = forward_only(args.batch, layers)
    got = ours(jpegs, args.batch, layers)
    base = naive(jpegs)
    print(f"images: {len(jpegs)} ({args.dataset or 'real photos, 300 px JPEG q90'}), batch {args.batch}")
    print(f"float32 GEMM (2048^3, 1 thread): {gflops:.1f} GFLOP/s; AlexNet to fc7: {macs / 1e6:.0f} M multiply-adds "
          f"per image -> compute limit {limit:.1f} images/s per core")
    print(f"forward alone, batch {args.batch}:        {fwd:6.1f} images/s  ({fwd / limit:.0%} of the limit)")
    print(f"ours end to end (decode included):  {got:6.1f} images/s  ({got / limit:.0%} of the limit)")
    print(f"naive loop (PIL, transforms, bs 1): {base:6.1f} images/s")
    print(f"ratio ours / naive: {got / base:.2f}x")
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    if not args.no_spark:
        lake = "data/lake"
        if not (ROOT / lake / "datasets" / "likability" / "_SUMMARY.json").exists():
            sys.exit("the Spark figure needs the demo's likability dataset: run `make demo` first (or --no-spark)")
        udf_vs_map_in_arrow(f"{lake}/datasets/likability")
        for master in ("local[1]", "local[2]"):
            s = spark_job(master, lake, "likability")
            forwards = s["input_rows"] * (2 if s["mirror"] else 1)
            print(f"Spark extract_features {master}: {s['input_rows']} images x {len(s['layers'])} layers"
                  f"{' + mirrored' if s['mirror'] else ''} in {s['seconds']:.1f} s -> "
                  f"{forwards / s['seconds']:.1f} forward passes/s (job start and writes included)")


if __name__ == "__main__":
    main()
