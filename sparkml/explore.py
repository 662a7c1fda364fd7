"""Exploring a personal archive (experiment 4): features, K-Means, a t-SNE map, cluster labels.

    explore.images (default <lake>/tables/images: an archive ingested with source.layout=
    instagram or folder, then prepare_images)
      -> features: raw pixels at explore.pixels (the original's first try) or a torchvision
         network's layer (VGG19 fc7 by default, through sparkml.extract_features)
      -> Spark ML KMeans for each k of explore.k_range with its silhouette (ClusteringEvaluator),
         so the choice of k is not blind; the clusters of explore.k are kept
      -> a 2-D t-SNE (scikit-learn) of up to explore.tsne_sample images, drawn as thumbnails
         framed in their cluster's colour; a contact sheet per cluster (closest to the centre first)
      -> per-cluster labels: the most frequent classes the network predicts for its images
         (weights whose card names the head's classes, ImageNet's: random weights would name noise)

    <lake>/tables/clusters    post_id, cluster, distance, x, y, category
    <lake>/models/kmeans      the Spark ML KMeansModel of explore.k
    <lake>/reports/explore/   metrics.json/.md, silhouette.png, tsne.png, cluster_NN.png
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from pyspark.sql import types as T

from core.figures import png, pyplot
from core.schemas import Reason, to_arrow

# The feature pass's rows: post_id, vector, top-1 ImageNet class, or a reject.
PASS = T.StructType([T.StructField("post_id", T.StringType()), T.StructField("vector", T.ArrayType(T.FloatType())),
                     T.StructField("category", T.StringType()), T.StructField("reason", T.StringType()),
                     T.StructField("detail", T.StringType())])
PASS_ARROW = to_arrow(PASS)


def pixels(image: np.ndarray, side: int) -> np.ndarray:
    """An RGB image as side x side x 3 values in 0..1, flattened (area-averaged downscale)."""
    import cv2

    return (cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255).ravel()


def explore_batch(batch: pa.RecordBatch, e: dict, endpoint: str | None = None,
                  region: str | None = None) -> pa.RecordBatch:
    """post_id + image (prepared JPEG) -> post_id, feature vector and (weights whose card names
    the head's classes: e["labels"]) the top-1 class, from the same forward pass; an image that
    does not decode becomes a reject row."""
    from sparkml.extract_features import decode, extract

    ids = batch.column("post_id").to_pylist()
    images = [decode(b) for b in batch.column("image").to_pylist()]
    ok = [i for i, im in enumerate(images) if im is not None]
    vectors: dict[int, np.ndarray] = {}
    categories: dict[int, str] = {}
    if ok and e["features"] == "pixels":
        vectors = {i: pixels(images[i], e["pixels"]) for i in ok}
    elif ok:
        layers = (e["layer"], "logits") if e["labels"] else (e["layer"],)
        got = extract([images[i] for i in ok], e["model"], e["weights"], layers, False, e["seed"], endpoint,
                      region, e["precision"])
        vectors = dict(zip(ok, got[(e["layer"], False)]))
        if e["labels"]:
            categories = {i: e["labels"][int(t)] for i, t in zip(ok, got[("logits", False)].argmax(1))}
    rows = {"post_id": ids, "vector": [vectors[i].tolist() if i in vectors else None for i in range(len(ids))],
            "category": [categories.get(i) for i in range(len(ids))],
            "reason": [None if i in vectors else Reason.CORRUPT_IMAGE.value for i in range(len(ids))],
            "detail": [None if i in vectors else "the prepared JPEG did not decode" for i in range(len(ids))]}
    return pa.RecordBatch.from_pydict(rows, schema=PASS_ARROW)


# ---------------------------------------------------------------- drawing (driver)


def _colours(k: int) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["tab20" if k > 10 else "tab10"](np.arange(k) % 20)


def silhouette_png(silhouettes: dict[int, float], chosen: int) -> bytes:
    plt = pyplot()

    ks = sorted(silhouettes)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(ks, [silhouettes[k] for k in ks], "o-")
    if chosen in silhouettes:
        ax.plot([chosen], [silhouettes[chosen]], "o", ms=12, mfc="none", mec="red", label=f"k = {chosen} (kept)")
        ax.legend()
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("silhouette (squared Euclidean)")
    ax.set_title("K-Means: silhouette for each k")
    ax.grid(alpha=0.3)
    return png(fig)


def tsne_png(xy: np.ndarray, clusters: np.ndarray, thumbs: list[bytes | None], k: int, title: str) -> bytes:
    """The t-SNE map: each image as a small thumbnail framed in its cluster's colour (a dot
    where no thumbnail is drawn)."""
    plt = pyplot()
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from PIL import Image

    colours = _colours(k)
    fig, ax = plt.subplots(figsize=(12, 12), dpi=100)
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[clusters], s=12)
    for (x, y), c, data in zip(xy, clusters, thumbs):
        if data is None:
            continue
        im = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((36, 36)))
        box = AnnotationBbox(OffsetImage(im, zoom=1), (x, y), frameon=True, pad=0.15,
                             bboxprops={"edgecolor": colours[c], "linewidth": 2})
        ax.add_artist(box)
    for c in range(k):
        ax.scatter([], [], color=colours[c], label=f"cluster {c}")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return png(fig)


def tsne(vectors: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA-initialised) after a PCA to at most 50 dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(vectors)
    x = PCA(n_components=min(50, n, vectors.shape[1]), random_state=seed).fit_transform(vectors) \
        if vectors.shape[1] > 50 else vectors
    return TSNE(n_components=2, perplexity=min(perplexity, max(2.0, (n - 1) / 3)), init="pca",
                random_state=seed).fit_transform(x)


def cluster_labels(categories: dict[int, list[str]], top: int = 3) -> dict[int, list[tuple[str, float]]]:
    """The `top` most frequent ImageNet classes of each cluster's images, with their shares."""
    from collections import Counter

    out = {}
    for c, names in categories.items():
        counts = Counter(n for n in names if n)
        total = max(1, sum(counts.values()))
        out[c] = [(name, round(n / total, 3)) for name, n in counts.most_common(top)]
    return out


# ---------------------------------------------------------------- the stage


def _labels(cfg) -> list[str] | None:
    """The network's class names when the weights' card has them (the clusters get labels); the
    model and weights are checked here, before anything is read."""
    from core.config import ConfigError
    from dl.models import ModelError
    from dl.weights import card
    from sparkml.extract_features import extractor

    e = cfg.explore
    if e.features != "model":
        return None
    try:
        extractor(e.model, e.weights, (e.layer,), e.seed, cfg.s3.endpoint, cfg.s3.region)
        return card(e.model, e.weights, cfg.s3.endpoint, cfg.s3.region).labels
    except ModelError as err:
        raise ConfigError(f"explore: {err}") from None


def _vectors(spark, cfg, images, labels):
    """Every image through explore_batch (persisted on disk): (the result with rejects, the usable
    vectors as ML features, persisted)."""
    from pyspark import StorageLevel
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from core import progress

    e = cfg.explore
    opts = {"features": e.features, "pixels": e.pixels, "model": e.model, "weights": e.weights, "layer": e.layer,
            "seed": e.seed, "precision": e.precision, "labels": labels}
    endpoint, region = cfg.s3.endpoint, cfg.s3.region
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(e.batch_rows))
    acc = progress.counter(spark, images.count())
    result = images.mapInArrow(lambda bs: progress.counted(bs, lambda b: explore_batch(b, opts, endpoint, region), acc),
                               PASS).persist(StorageLevel.DISK_ONLY)
    data = result.where(F.col("reason").isNull()).select("post_id", "category", array_to_vector("vector")
                                                         .alias("features")).persist(StorageLevel.MEMORY_AND_DISK)
    return result, data


def _ks(e, data, n: int) -> tuple[list[int], dict[int, str]]:
    """The k to fit (explore.k_range and explore.k) and those skipped with why; an explore.k that
    the images cannot hold is a ConfigError."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from core.config import ConfigError

    # K-Means cannot place k centres on fewer distinct points (copies of one image are one point)
    distinct = data.select(F.xxhash64(vector_to_array("features")).alias("h")).distinct().count()
    if e.k >= distinct:
        raise ConfigError(f"explore.k={e.k} clusters need more than {e.k} distinct images: explore.images has {n} "
                          f"usable images, {distinct} distinct")
    skipped = {k: f"needs more than {k} distinct images, there are {distinct}" for k in e.k_range if k >= distinct}
    if skipped:
        print(f"explore: silhouettes of k {sorted(skipped)} skipped: {distinct} distinct images", flush=True)
    return sorted({k for k in e.k_range if k not in skipped} | {e.k}), skipped


def _kmeans(e, data, ks: list[int]):
    """(silhouette per k, the model fitted with explore.k)."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.evaluation import ClusteringEvaluator

    evaluator = ClusteringEvaluator(featuresCol="features", predictionCol="cluster", metricName="silhouette",
                                    distanceMeasure="squaredEuclidean")
    silhouettes, fitted = {}, None
    for k in ks:
        km = KMeans(k=k, seed=e.seed, featuresCol="features", predictionCol="cluster", maxIter=e.max_iter).fit(data)
        silhouettes[k] = float(evaluator.evaluate(km.transform(data)))
        if k == e.k:
            fitted = km
    return silhouettes, fitted


def _assign(spark, fitted, data):
    """Each image's cluster and distance to its centre (persisted), and the centres' broadcast."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    centres = [np.asarray(c) for c in fitted.clusterCenters()]
    bc = spark.sparkContext.broadcast(np.stack(centres))

    @F.udf(T.DoubleType())
    def distance(v, c):
        return float(np.linalg.norm(v.toArray() - bc.value[c]))

    assigned = fitted.transform(data).withColumn("distance", distance("features", "cluster")).persist(
        StorageLevel.MEMORY_AND_DISK)
    return assigned, bc


def _map(spark, e, assigned):
    """The t-SNE map's sample (a hash of post_id: the same images on every rerun), its 2-D
    coordinates, and those coordinates as a frame to join."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    # The sample's ids first, then its vectors once each (float32, as the pass made them): sorting
    # whole rows made every partition send up to tsne_sample vectors to the driver, which at
    # pixel features (67,500 values) ran the driver JVM out of heap, and Spark then waits forever.
    ids = [r["post_id"] for r in assigned.select("post_id").orderBy(F.xxhash64("post_id", F.lit(e.seed)), "post_id")
           .limit(e.tsne_sample).collect()]
    picked = spark.createDataFrame(list(enumerate(ids)), "rank int, post_id string")
    sample = assigned.join(F.broadcast(picked), "post_id").select(
        "rank", "post_id", "cluster", vector_to_array("features", "float32").alias("v")) \
        .toPandas().sort_values("rank").reset_index(drop=True)
    xy = tsne(np.stack(sample.v.to_numpy()).astype(np.float32), e.seed, e.perplexity) if len(sample) > 3 else \
        np.zeros((len(sample), 2))
    coords = spark.createDataFrame([(p, float(a), float(b)) for p, (a, b) in zip(sample.post_id, xy)],
                                   "post_id string, x double, y double")
    return sample, xy, coords


def _pictures(spark, e, report: str, images, clusters, sizes: dict, sample, xy, n: int, what: str,
              silhouettes: dict) -> dict[int, str]:
    """Each cluster's contact sheet (closest to the centre first), the t-SNE map with thumbnails
    and the silhouette plot, written to the report; returns cluster -> its sheet's name."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    from core import storage
    from sparkml.captions.retrieval import contact_sheet, jpegs

    near = clusters.withColumn("r", F.row_number().over(Window.partitionBy("cluster").orderBy("distance", "post_id"))) \
        .where(F.col("r") <= e.sheet).select("post_id", "cluster", "distance", "r").collect()
    drawn = set(sample.post_id[: e.map_thumbnails])
    jpeg = jpegs(images, drawn | {r["post_id"] for r in near})
    sheets = {}
    for c in sorted(sizes):
        rows = sorted((r for r in near if r["cluster"] == c), key=lambda r: r["r"])
        name = f"cluster_{c:02d}.png"
        storage.write_bytes(spark, f"{report}/{name}", contact_sheet(
            f"cluster {c}: {sizes[c]} images, closest to the centre first",
            [(r["post_id"], r["distance"], jpeg.get(r["post_id"])) for r in rows]))
        sheets[c] = name
    storage.write_bytes(spark, f"{report}/tsne.png", tsne_png(
        xy, sample.cluster.to_numpy(), [jpeg.get(p) if p in drawn else None for p in sample.post_id], e.k,
        f"t-SNE of {len(sample)} of {n} images ({what}), K-Means k = {e.k}"))
    storage.write_bytes(spark, f"{report}/silhouette.png", silhouette_png(silhouettes, e.k))
    return sheets


def _named(e, clusters, sizes: dict, labels: list[str] | None) -> tuple[dict | None, str | None]:
    """(cluster -> its top predicted classes, None) when the network names its classes, else
    (None, why there are no labels)."""
    if labels:
        cats = {c: [] for c in sizes}
        for r in clusters.select("cluster", "category").collect():
            cats[int(r["cluster"])].append(r["category"])
        return {str(c): v for c, v in cluster_labels(cats).items()}, None
    return None, ("no cluster labels: they are the classes the network predicts, which needs explore.features=model "
                  "with weights whose card names the head's classes (imagenet, or a staged ImageNet file)" + (
                      "; with random weights they would be meaningless" if e.features == "model" else ""))


def explore(spark, cfg):
    """explore.images -> clusters, silhouettes, the t-SNE map and contact sheets."""
    from pyspark.sql import functions as F

    from core import storage
    from core.lake import Lake, Summary, begin_output, close_output, read_complete, write_rejected, write_table

    e = cfg.explore
    lake = Lake(cfg.lake)
    labels = _labels(cfg)
    uri = storage.qualify(e.images) if e.images else lake.table("images")
    images = read_complete(spark, uri, "run jobs/ingest.py (source.layout=instagram or folder) and "
                                       "jobs/prepare_images.py for the archive first").select("post_id", "image")
    out, report, model_uri = lake.table("clusters"), lake.report("explore"), lake.model("kmeans")
    result, data = _vectors(spark, cfg, images, labels)
    n_input = images.count()
    n = data.count()
    ks, skipped = _ks(e, data, n)
    # the run can go ahead: only now are the previous outputs replaced
    begin_output(spark, out)
    for o in (report, model_uri):  # a rerun with another k must not leave the old contact sheets
        storage.delete(spark, o)
    rejected = write_rejected(spark, lake, "explore", result.where(F.col("reason").isNotNull())
                              .select("post_id", "reason", "detail"))
    silhouettes, fitted = _kmeans(e, data, ks)
    fitted.write().overwrite().save(model_uri)
    assigned, bc = _assign(spark, fitted, data)
    sample, xy, coords = _map(spark, e, assigned)
    write_table(assigned.join(coords, "post_id", "left").select("post_id", "cluster", "distance", "x", "y",
                                                                "category"), lake, "clusters")
    clusters = spark.read.parquet(out)
    sizes = {int(r["cluster"]): int(r["count"]) for r in clusters.groupBy("cluster").count().collect()}
    what = f"raw pixels {e.pixels}x{e.pixels}" if e.features == "pixels" else f"{e.model} {e.layer} ({e.weights})"
    sheets = _pictures(spark, e, report, images, clusters, sizes, sample, xy, n, what, silhouettes)
    labels, note = _named(e, clusters, sizes, labels)
    best = max(silhouettes, key=silhouettes.get)
    body = {"images": uri, "features": what, "rows": n, "k": e.k, "silhouettes": {str(k): v for k, v in
                                                                                    silhouettes.items()},
            "best_silhouette_k": best, "sizes": {str(c): v for c, v in sorted(sizes.items())},
            "labels": labels, "labels_note": note, "tsne_sample": len(sample), "sheets": sheets,
            "skipped_k": {str(k): why for k, why in skipped.items()},
            "map": "tsne.png", "silhouette_plot": "silhouette.png"}
    storage.write_bytes(spark, f"{report}/metrics.json", json.dumps(body, indent=1).encode())
    storage.write_bytes(spark, f"{report}/metrics.md", markdown(body).encode())
    close_output(spark, {"stage": "explore", "output": report})
    close_output(spark, {"stage": "explore", "output": model_uri, "k": e.k})
    for df in (assigned, data, result):
        df.unpersist()
    bc.destroy()
    return Summary(stage="explore", input_rows=n_input, output_rows=sum(sizes.values()), rejected=rejected,
                   output=out, extra={"report": report, "model": model_uri, "k": e.k, "features": what,
                                      "silhouettes": body["silhouettes"], "best_silhouette_k": best,
                                      "sizes": body["sizes"], "labels": labels, "tsne_sample": len(sample),
                                      "skipped_k": body["skipped_k"]})


def markdown(body: dict) -> str:
    lines = [f"# Archive exploration: {body['rows']} images, {body['features']}", "",
             "| k | silhouette |", "|---|---|"]
    lines += [f"| {k}{' (kept)' if int(k) == body['k'] else ''} | {v:.3f} |" for k, v in body["silhouettes"].items()]
    lines += ["", f"Best silhouette at k = {body['best_silhouette_k']}.", "", "| cluster | images | labels |",
              "|---|---|---|"]
    for c, size in body["sizes"].items():
        lab = ", ".join(f"{n} ({s:.0%})" for n, s in (body["labels"] or {}).get(c, [])) or "-"
        lines.append(f"| {c} | {size} | {lab} |")
    if body["labels_note"]:
        lines += ["", body["labels_note"]]
    if body.get("skipped_k"):
        lines += ["", "k not measured: " + "; ".join(f"{k} ({why})" for k, why in body["skipped_k"].items())]
    return "\n".join(lines) + "\n"
