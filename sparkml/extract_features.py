"""CNN features of a dataset's images, or of any images table, on Spark executors.

    <lake>/datasets/<features.dataset>/{train,val,test} -> <lake>/tables/features
    features.images (an images table: an archive, new images) -> the same, split and label null
        one row per image, layer and (with features.mirror) mirroring

The per-batch work is `extract`, a plain function on JPEG bytes that needs torch and
torchvision only (no Spark): decode, the model's preprocessing for the whole batch, one
forward pass through the network cut at the highest layer asked for (dl.models), and the
mirrored images in the same pass. The model is built once per Python worker, channels_last,
on the task's GPU when Spark gave it one (spark.task.resource.gpu.amount), with optional
bfloat16 autocast (features.precision).
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from core.schemas import TABLES, Reason, ResultRows, to_arrow, with_reject

RESULT_ARROW = to_arrow(with_reject(TABLES["features"].schema))


def device() -> str:
    """cuda:<n> when this Spark task was given a GPU (spark.task.resource.gpu.amount), or when
    torch runs without Spark on a machine that has one; else cpu."""
    import torch

    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:  # torch alone (a GPU box without Spark)
        ctx = None
    if not torch.cuda.is_available():
        return "cpu"
    if ctx is None:
        return "cuda"
    gpus = ctx.resources().get("gpu")
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else "cpu"


def task_threads() -> None:
    """One Spark task per spark.task.cpus cores: as many torch threads, no more (torch's
    default, every core, oversubscribes the machine when each core runs a task)."""
    import torch

    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:  # torch alone (a GPU box without Spark)
        return
    if ctx is not None:
        torch.set_num_threads(ctx.cpus())


@functools.lru_cache(maxsize=2)
def extractor(model: str, weights: str, layers: tuple[str, ...], seed: int = 0,
              endpoint: str | None = None, region: str | None = None, on: str = "cpu"):
    """(FeatureExtractor on device `on`, channels_last, Preprocessing) for this worker, built once."""
    import torch

    from dl.models import FeatureExtractor, load_model, preprocessing

    task_threads()
    net = load_model(model, weights, endpoint=endpoint, region=region, seed=seed)
    fx = FeatureExtractor(net, layers).eval().to(on, memory_format=torch.channels_last)
    return fx, preprocessing(model, weights, endpoint, region)


def decode(data: bytes | None) -> np.ndarray | None:
    """RGB uint8 of a JPEG (or any format OpenCV reads), None when it does not decode."""
    import cv2

    if not data:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else np.ascontiguousarray(bgr[..., ::-1])


def extract(images: list[np.ndarray], model: str, weights: str, layers: tuple[str, ...], mirror: bool,
            seed: int = 0, endpoint: str | None = None, region: str | None = None,
            precision: str = "fp32") -> dict[tuple[str, bool], np.ndarray]:
    """(layer, mirrored) -> float32 (N, dim) features of N RGB uint8 images, on this task's GPU
    when it has one; precision bf16 runs the network under bfloat16 autocast."""
    import torch

    on = device()
    net, pre = extractor(model, weights, tuple(layers), seed, endpoint, region, on)
    x = pre(np.stack(images) if len({a.shape for a in images}) == 1 else images).to(on, non_blocking=True)
    if mirror:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.inference_mode(), torch.autocast(torch.device(on).type, torch.bfloat16, enabled=precision == "bf16"):
        out = net(x)
    n = len(images)
    return {(layer, m): out[layer][n * m:n * (m + 1)].float().cpu().numpy() for layer in layers
            for m in ((False, True) if mirror else (False,))}


def extract_batch(batch: pa.RecordBatch, model: str, weights: str, layers: tuple[str, ...], mirror: bool,
                  seed: int, endpoint: str | None = None, region: str | None = None,
                  precision: str = "fp32") -> pa.RecordBatch:
    """post_id, split, label, image (JPEG) -> one row per image, layer and mirroring, or one
    reject row for an image that does not decode."""
    ids = batch.column("post_id").to_pylist()
    splits, labels = batch.column("split").to_pylist(), batch.column("label").to_pylist()
    pixels = [decode(b) for b in batch.column("image").to_pylist()]
    ok = [i for i, p in enumerate(pixels) if p is not None]
    feats = extract([pixels[i] for i in ok], model, weights, layers, mirror, seed, endpoint, region,
                    precision) if ok else {}
    rows = ResultRows(RESULT_ARROW, model=model, weights=weights)

    def of(i):
        return {"post_id": ids[i], "split": splits[i], "label": labels[i]}

    finite = np.ones(len(ok), bool)  # an image with a NaN or infinite value in any of its vectors is rejected
    for mat in feats.values():
        finite &= np.isfinite(mat).all(1)
    for (layer, mirrored), mat in feats.items():
        for j, i in enumerate(ok):
            if finite[j]:
                rows.add(**of(i), layer=layer, mirrored=mirrored, vector=mat[j].tolist())
    for j in np.flatnonzero(~finite):
        rows.reject(Reason.NON_FINITE_FEATURES, f"{model} ({weights}) gave NaN or infinite values for this image",
                    **of(ok[j]))
    for i, p in enumerate(pixels):
        if p is None:
            rows.reject(Reason.CORRUPT_IMAGE, "the dataset's JPEG did not decode", **of(i))
    return rows.batch()


def _inputs(spark, cfg):
    """(post_id, split, label, image) of what features are extracted from, and where it is."""
    from pyspark.sql import functions as F

    from core import storage
    from core.lake import Lake, read_complete, union_all
    from core.schemas import SPLITS

    f, lake = cfg.features, Lake(cfg.lake)
    if f.images:
        uri = storage.qualify(f.images if "/" in f.images or ":" in f.images else lake.table(f.images))
        images = read_complete(spark, uri, "run jobs/prepare_images.py for those images first")
        return images.select("post_id", F.lit(None).cast("string").alias("split"),
                             F.lit(None).cast("int").alias("label"), "image"), uri
    root = lake.dataset(f.dataset)
    parts = [read_complete(spark, f"{root}/{split}", f"run jobs/build_dataset.py first (dataset.name={f.dataset}), "
                                                     "or give features.images", summary=root)
             for split in SPLITS]
    return union_all([df.select("post_id", F.lit(split).alias("split"), F.col("label").cast("int").alias("label"),
                                "image") for split, df in zip(SPLITS, parts)]), root


def extract_features(spark, cfg) -> "Summary":
    """<lake>/datasets/<features.dataset> (or features.images) -> <lake>/tables/features (+ rejects)."""
    from pyspark.sql import functions as F

    from core.config import ConfigError
    from core.lake import Lake, Summary, begin_output, per_record

    f = cfg.features
    lake = Lake(cfg.lake)
    from dl.models import ModelError
    from dl.weights import card, describe

    try:
        extractor(f.model, f.weights, tuple(f.layers), f.seed, cfg.s3.endpoint, cfg.s3.region)  # fail here, once
        weights = card(f.model, f.weights, cfg.s3.endpoint, cfg.s3.region)
    except ModelError as e:
        raise ConfigError(f"features: {e}") from None
    print(f"extract_features: weights {f.weights}: {describe(weights)}", flush=True)
    images, source = _inputs(spark, cfg)
    out = lake.table("features")
    begin_output(spark, out)
    layers = tuple(f.layers)
    args = (f.model, f.weights, layers, f.mirror, f.seed, cfg.s3.endpoint, cfg.s3.region, f.precision)
    with per_record(spark, lake, "extract_features", images, lambda b: extract_batch(b, *args), "features",
                    f.batch_rows) as (good, rejected):
        per_layer = good.groupBy("layer").agg(F.count("*").alias("n"), F.max(F.size("vector")).alias("d")).collect()
        posts = good.select("post_id").distinct().count()
    rows = sum(int(r["n"]) for r in per_layer)
    dims = {r["layer"]: int(r["d"]) for r in per_layer}
    per_image = len(layers) * (2 if f.mirror else 1)
    return Summary(stage="extract_features", input_rows=images.count(), output_rows=posts, rejected=rejected,
                   output=out, extra={"rows": rows, "rows_per_image": per_image, "model": f.model,
                                      "weights": f.weights, "seed": f.seed, "layers": list(layers), "mirror": f.mirror,
                                      "dims": dims, "normalisation": weights.normalisation,
                                      "weights_sha256": weights.sha256, "precision": f.precision,
                                      "dataset": None if f.images else f.dataset, "images": source})
