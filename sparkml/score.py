"""Batch scoring of new images with the models a run trained.

    score.input (a folder, a manifest, an Instagram export or an images table)
      -> ingest's checks and prepare_images' decode + resize (rejects with reasons)
      -> every model asked for that exists: the exported city / topics / likability CNNs
         (dl.score) and the best Spark SVM of train_svm over features extracted on the fly
         with the network its features came from (sparkml.extract_features)
      -> <lake>/tables/scores: one row per image and model (schemas.SCORES)

New posts are never written to the lake's posts or images tables: scoring leaves the
training data alone. Models are loaded once per Python worker and run one Arrow batch
(score.batch_rows images) per forward pass.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core import progress
from core.config import Config, ConfigError, Source
from core.lake import (SUMMARY_FILE, IncompleteInput, Lake, Summary, begin_output, open_input, union_all,
                          write_rejected, write_table)
from core.schemas import TABLES, Reason, ResultRows, to_arrow, with_reject

STAGE = "score"
CNNS = ("city", "topics", "likability")
SVM = "likability_svm"
REMEDY = {"city": "jobs/train_cnn.py --task city", "topics": "jobs/train_cnn.py --task topics",
          "likability": "jobs/train_cnn.py --task likability", SVM: "jobs/train_svm.py"}
# The scoring pass's rows: the scores table + the SVM's feature vector (consumed, then dropped).
PASS = with_reject(TABLES["scores"].schema).add("vector", T.ArrayType(T.FloatType()))
PASS_ARROW = to_arrow(PASS)


# ---------------------------------------------------------------- which models, checked


def _svm_model(spark: SparkSession, lake: Lake) -> dict | None:
    """The best SVM train_svm chose on validation, with the features it was trained on."""
    if not storage.exists(spark, f"{lake.model(SVM)}/{SUMMARY_FILE}"):
        return None
    summary = open_input(spark, lake.model(SVM), "run jobs/train_svm.py first", fresh=False)
    best, made = summary["best"], summary["features"]
    # the version digests what the model is, not the summary's run id and timings: a rerun of the same
    # training gets the same; the path is relative to the models folder, so a lake moved whole finds its own
    version = hashlib.blake2b(json.dumps([best, made], sort_keys=True, default=str).encode(), digest_size=6)
    return {"path": f"{lake.model(SVM)}/{best['model']}", "layer": best["layer"], "variant": best["variant"],
            "features": made, "version": version.hexdigest()}


def models(spark: SparkSession, cfg: Config) -> tuple[dict, dict]:
    """(name -> model, name -> how to make it) for the models score.models asks for; the
    exported ones are checked against what they are asked to score (ConfigError)."""
    from dl.models import ModelError
    from dl.score import read_exported

    lake = Lake(cfg.lake)
    found, missing = {}, {}
    for name in cfg.score.models:
        if name == SVM:
            m = _svm_model(spark, lake)
        else:
            try:
                m = read_exported(lake.model(name), cfg.s3.endpoint, cfg.s3.region)
            except ModelError as e:
                raise ConfigError(f"score: models/{name}: {e}") from None
        if m is None:
            missing[name] = f"not in {lake.model(name)}: run {REMEDY[name]}"
        else:
            found[name] = m
    if not found:
        raise IncompleteInput("no model to score with: " + "; ".join(f"{k} {v}" for k, v in missing.items()))
    for name, m in found.items():
        _check(spark, cfg, name, m)
    return found, missing


def _check(spark: SparkSession, cfg: Config, name: str, m) -> None:
    """A model whose preprocessing, label set or feature network differs from what it would
    score gives numbers that mean nothing: refuse it, saying what to change."""
    size = cfg.prepare.size
    if name == SVM:
        from dl.models import ModelError
        from dl.weights import card

        f = cfg.features
        made = m["features"]
        if made.get("model") != [f.model] or made.get("weights") != [f.weights] or \
                made.get("seed") not in (None, f.seed):
            raise ConfigError(f"score: {SVM} was trained on {made} features, features.model/weights/seed here are "
                              f"{f.model}/{f.weights}/{f.seed}: set them to what extract_features used")
        try:
            now = card(f.model, f.weights, cfg.s3.endpoint, cfg.s3.region)
        except ModelError as e:
            raise ConfigError(f"score: features: {e}") from None
        if made.get("normalisation") != now.normalisation:
            raise ConfigError(f"score: {SVM} was trained on features of images normalised as {made.get('normalisation')}"
                              f", the card of {f.weights} now says {now.normalisation}: extract the features again")
        if made.get("weights_sha256") != now.sha256:
            raise ConfigError(f"score: {SVM} was trained on features of weights with sha256 "
                              f"{made.get('weights_sha256')}, {f.weights} now has {now.sha256}: the weights file was "
                              "replaced; extract the features and train the SVM again")
        return
    pre, labels = m.meta["preprocessing"], m.labels  # model.json already fits its schema (dl.export)
    if pre.get("size") != size:
        raise ConfigError(f"score: models/{name} was trained on {pre.get('size')} px prepared images (crop "
                          f"{pre.get('crop')}), prepare.size is {size}: score with --set prepare.size={pre.get('size')}")
    if name == "likability" and labels != ["bad", "good"]:
        raise ConfigError(f"score: models/likability has labels {labels}, not bad/good: it is not a likability model")
    if name == "city":
        want = cfg.score.labels
        if labels is None or len(labels) != m.meta["outputs"] or labels == ["bad", "good"]:
            raise ConfigError(f"score: models/city has labels {labels}: it is not a city classifier")
        if want is not None and list(want) != list(labels):
            raise ConfigError(f"score: models/city predicts {labels}, score.labels asks for {list(want)}")
    if name == "topics":
        lda = Lake(cfg.lake).model("lda")
        if storage.exists(spark, f"{lda}/{SUMMARY_FILE}"):
            topics = open_input(spark, lda, "run jobs/train_lda.py first", fresh=False).get("num_topics")
            if topics is not None and topics != m.meta["outputs"]:
                raise ConfigError(f"score: models/topics regresses {m.meta['outputs']} topics, this lake's LDA has "
                                  f"{topics}: its vectors would not be in the LDA's topic space (retrain topics)")


# ---------------------------------------------------------------- the new images


def new_images(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(prepared images: post_id, city, image; rejects; input keys) of score.input, through
    ingest's checks and prepare_images' decode and resize, nothing written."""
    from sparkml.images.prepare_images import options, prepare_batch
    from sparkml.ingest.ingest import plan, read_posts

    s = cfg.score
    if s.input is None:
        raise ConfigError("score.input is required: a folder of images, a manifest, an Instagram export or an "
                          "images table (score.layout says which)")
    if s.layout == "images":
        uri = storage.qualify(s.input if "/" in s.input or ":" in s.input else Lake(cfg.lake).table(s.input))
        if not storage.exists(spark, uri):
            raise ConfigError(f"score.input {s.input}: no images table there")
        images = spark.read.parquet(uri).select("post_id", F.lit(None).cast("string").alias("city"), "image")
        none = spark.createDataFrame([], TABLES["rejected"].schema)
        return images, none, images.select(F.col("post_id").alias("key"))
    src = cfg.model_copy(update={"source": Source(path=s.input, layout=s.layout)})
    try:
        todo, rejects, inputs, _ = plan(spark, src)
    except ConfigError as e:  # ingest's words for its own setting
        raise ConfigError(str(e).replace("source.path", "score.input", 1)) from None
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.ingest.batch_rows))
    posts = read_posts(spark, todo, src)
    opts = options(cfg.prepare)
    cities = todo.select("post_id", "city")  # from the metadata: selecting it from posts would read the bytes again
    acc = progress.counter(spark)
    prepared = posts.select("post_id", "image_bytes").mapInArrow(
        lambda batches: progress.counted(batches, lambda b: prepare_batch(b, **opts), acc),
        with_reject(TABLES["images"].schema))
    prepared = prepared.select("post_id", "image", "reason", "detail").persist(StorageLevel.DISK_ONLY)
    good = prepared.where(F.col("reason").isNull()).join(cities, "post_id").select("post_id", "city", "image")
    bad = prepared.where(F.col("reason").isNotNull()).select("post_id", "reason", "detail")
    return good, union_all([rejects.select("post_id", "reason", "detail"), bad]), \
        inputs.select(F.col("key").cast("string"))


def _check_cities(images: DataFrame, found: dict) -> None:
    """Posts that say their city (a manifest, InstaCities folders) must be of cities the
    city model knows: else its probabilities answer another question."""
    if "city" not in found:
        return
    known = set(found["city"].labels)
    given = {r["city"] for r in images.select("city").distinct().collect() if r["city"] is not None}
    unknown = sorted(given - known)
    if unknown:
        raise ConfigError(f"score: the input holds posts of {unknown[:5]}, which models/city does not predict "
                          f"(its labels: {sorted(known)}); drop them or train a model on those cities")


# ---------------------------------------------------------------- the per-batch work


def score_batch(batch: pa.RecordBatch, found: dict, cfg_f: dict, endpoint: str | None,
                region: str | None) -> pa.RecordBatch:
    """post_id + image (prepared JPEG) -> one row per image and model (the SVM's with its
    feature vector, scored on the Spark side), or one reject row for an image that does not decode."""
    from dl.score import predict, probabilities
    from sparkml.extract_features import decode, device, extract, task_threads

    task_threads()
    ids = batch.column("post_id").to_pylist()
    pixels = [decode(b) for b in batch.column("image").to_pylist()]
    ok = [i for i, p in enumerate(pixels) if p is not None]
    rows = ResultRows(PASS_ARROW)

    def add(i, **values):
        rows.add(post_id=ids[i], **values)

    if ok:
        images = np.stack([pixels[i] for i in ok])
        on = device()
        for name, m in found.items():
            if name == SVM:
                vec = extract([pixels[i] for i in ok], cfg_f["model"], cfg_f["weights"], (m["layer"],), False,
                              cfg_f["seed"], endpoint, region, cfg_f["precision"])[(m["layer"], False)]
                for j, i in enumerate(ok):
                    add(i, model=name, version=m["version"], vector=vec[j].tolist())
                continue
            logits = predict(images, m, endpoint, region, on)
            probs = probabilities(logits, m)
            for j, i in enumerate(ok):
                if name == "city":
                    add(i, model=name, version=m.version, city=m.labels[int(probs[j].argmax())],
                        city_probs=list(zip(m.labels, probs[j].tolist())))
                elif name == "topics":
                    add(i, model=name, version=m.version, topics=probs[j].tolist())
                else:
                    add(i, model=name, version=m.version, likability_score=float(logits[j, 1] - logits[j, 0]),
                        likability_prob=float(probs[j, 1]))
    for i, p in enumerate(pixels):
        if p is None:
            rows.reject(Reason.CORRUPT_IMAGE, "the prepared JPEG did not decode", post_id=ids[i])
    return rows.batch()


def _svm_scores(rows: DataFrame, svm: dict) -> DataFrame:
    """The SVM rows with the decision value of the saved Spark ML pipeline (standardise +
    LinearSVC) as the likability score; LinearSVC gives no probability."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import array_to_vector, vector_to_array

    model = PipelineModel.load(svm["path"])
    out = model.transform(rows.withColumn("features", array_to_vector("vector")))
    return out.withColumn("likability_score", vector_to_array("rawPrediction")[1].cast("double"))


# ---------------------------------------------------------------- the stage


def score(spark: SparkSession, cfg: Config) -> Summary:
    """score.input -> <lake>/tables/scores (+ rejects of stage score)."""
    from dl.models import ModelError
    from dl.score import _network as network
    from sparkml.extract_features import extractor

    lake = Lake(cfg.lake)
    found, missing = models(spark, cfg)
    f = cfg.features
    cfg_f = {"model": f.model, "weights": f.weights, "seed": f.seed, "precision": f.precision}
    if SVM in found:
        try:
            extractor(f.model, f.weights, (found[SVM]["layer"],), f.seed, cfg.s3.endpoint, cfg.s3.region)
        except ModelError as e:
            raise ConfigError(f"score: features: {e}") from None
    for name, m in found.items():  # a damaged model.pt: one line here, not a trace from every task
        if name != SVM:
            try:
                network(m.root, m.version, cfg.s3.endpoint, cfg.s3.region, "cpu")
            except ModelError as e:
                raise IncompleteInput(f"score: models/{name}: {e}; export it again with jobs/train_cnn.py "
                                      f"--task {name}") from None
    out = lake.table("scores")
    images, rejects, inputs = new_images(spark, cfg)
    _check_cities(images, found)  # also computes the prepared images (persisted): not timed as scoring
    n_inputs = inputs.count()
    if n_inputs == 0:  # an empty folder is a mistake far more often than a wish to clear the scores
        raise ConfigError(f"score.input {cfg.score.input} holds no images ({cfg.score.layout} layout): nothing to "
                          "score; the previous scores are kept")
    begin_output(spark, out)  # the input is good: only now are the previous scores replaced
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.score.batch_rows))
    endpoint, region = cfg.s3.endpoint, cfg.s3.region
    acc = progress.counter(spark, images.count())
    t0 = time.perf_counter()
    scored = images.select("post_id", "image").mapInArrow(lambda batches: progress.counted(
        batches, lambda b: score_batch(b, found, cfg_f, endpoint, region), acc), PASS).persist(StorageLevel.DISK_ONLY)
    n_rows = scored.count()
    seconds = time.perf_counter() - t0
    rejected = write_rejected(spark, lake, STAGE, rejects.unionByName(
        scored.where(F.col("reason").isNotNull()).select("post_id", "reason", "detail")))
    good = scored.where(F.col("reason").isNull())
    parts = [good.where(F.col("model") != SVM)]
    if SVM in found:
        parts.append(_svm_scores(good.where(F.col("model") == SVM), found[SVM]).select(*good.columns))
    write_table(union_all(parts).repartition(max(1, spark.sparkContext.defaultParallelism), "post_id"), lake, "scores")
    written = spark.read.parquet(out)
    per_model = {r["model"]: int(r["count"]) for r in written.groupBy("model").count().collect()}
    posts = written.select("post_id").distinct().count()
    scored.unpersist()
    return Summary(stage=STAGE, input_rows=n_inputs, output_rows=posts, rejected=rejected, output=out, extra={
        "input": storage.qualify(cfg.score.input), "layout": cfg.score.layout, "rows_per_model": per_model,
        "models": {k: (v["version"] if k == SVM else v.version) for k, v in found.items()},
        "missing_models": missing, "images_per_s": round(posts / max(seconds, 1e-9), 2),
        "scoring_seconds": round(seconds, 2), "pass_rows": n_rows})
