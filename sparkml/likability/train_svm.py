"""The likability classifiers on CNN features (experiment 3): Spark LinearSVC tuned over C by
cross-validation, against the original's MLlib SVMWithSGD and scikit-learn baselines.

    <lake>/tables/features -> <lake>/reports/likability_svm/metrics.{json,md}
                              <lake>/models/likability_svm/<layer>_<variant>/  (Spark ML PipelineModel)

For each layer and each variant, `normal` (train on the features of the images) and
`flipped+normal` (also on those of their mirrored copies, the original's augmentation):

- Spark LinearSVC over C with k folds by post_id (an image and its mirror are always in the
  same fold), two engines (svm.engine): `tasks` for rows that fit a task (one Spark job, a
  task per core fitting liblinear's LinearSVC with the same objective, metric average
  precision; the refit saved as a Spark ML PipelineModel), `spark_ml` for any size: Spark ML
  Pipeline(StandardScaler, LinearSVC) under CrossValidator with `parallelism` models at a
  time, metric areaUnderPR, or TrainValidationSplit (svm.search=trainval).
- MLlib SVMWithSGD over regParam x step, on the same folds (normal variant, for parity).
- scikit-learn LinearSVC over the same C grid (GridSearchCV on the same folds) and
  RandomForestClassifier(500 trees), on the driver, when the training rows fit under
  svm.driver_max_rows.

Training uses the train and val splits; every figure is measured on the test split's normal
(unmirrored) images. C and regParam: scikit-learn's hinge-loss LinearSVC minimises
0.5 |w|^2 + C sum(hinge) and Spark's LinearSVC (1/n) sum(hinge) + 0.5 regParam |w|^2, the
same objective when regParam = 1 / (C n), n the training rows (`reg_param`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.lake import UnusableInput

VARIANTS = ("normal", "flipped+normal")
ALGORITHMS = ("spark_linearsvc", "sklearn_linearsvc", "sklearn_random_forest", "mllib_svmwithsgd")
TITLES = {"spark_linearsvc": "Spark LinearSVC", "sklearn_linearsvc": "sklearn LinearSVC",
          "sklearn_random_forest": "sklearn RandomForest", "mllib_svmwithsgd": "MLlib SVMWithSGD"}
# Average precision on the test split, as published (the original had no Spark ML column).
PUBLISHED = {
    ("fc7", "sklearn_linearsvc", "flipped+normal"): 0.599, ("fc7", "sklearn_linearsvc", "normal"): 0.597,
    ("fc7", "sklearn_random_forest", "flipped+normal"): 0.587, ("fc7", "sklearn_random_forest", "normal"): 0.579,
    ("fc7", "mllib_svmwithsgd", "normal"): 0.600,
    ("fc6", "sklearn_linearsvc", "flipped+normal"): 0.587, ("fc6", "sklearn_linearsvc", "normal"): 0.603,
    ("fc6", "sklearn_random_forest", "flipped+normal"): 0.578, ("fc6", "sklearn_random_forest", "normal"): 0.579,
    ("fc6", "mllib_svmwithsgd", "normal"): 0.598,
}
MODEL = "likability_svm"
# pyspark.mllib's evaluation classes still build an SQLContext and warn about it on every call.
warnings.filterwarnings("ignore", message="Deprecated in 3.0.0", category=FutureWarning)
PARTITION_BYTES = 64 << 20  # training rows per partition: a few aggregation tasks per iteration, not thousands


def reg_param(c: float, n: int) -> float:
    """Spark's regParam for scikit-learn's C on n training rows (the same hinge-loss objective)."""
    return 1.0 / (c * n)


def model_dir(layer: str, variant: str) -> str:
    return f"{layer}_{variant.replace('+', '_')}"


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's average precision: sum over ranks of (R_n - R_(n-1)) P_n, no interpolation."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def area_under_pr(spark, labels: np.ndarray, scores: np.ndarray) -> float:
    """Spark's areaUnderPR (BinaryClassificationEvaluator): the PR curve through every distinct
    score, integrated by the trapezoid rule from (recall 0, precision of the top score)."""
    from pyspark.mllib.evaluation import BinaryClassificationMetrics

    pairs = spark.sparkContext.parallelize(list(zip(scores.astype(float).tolist(), labels.astype(float).tolist())), 1)
    return float(BinaryClassificationMetrics(pairs).areaUnderPR)


def _arrays(df, column: str = "vector") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X float32 (n, d), y, fold) of a frame with the vector column, label, fold, collected to
    the driver in (post_id, mirrored) order: the same arrays whatever the partitioning."""
    from pyspark.ml.functions import vector_to_array

    vec = vector_to_array(column) if dict(df.dtypes)[column] == "vector" else df[column]
    pdf = df.orderBy("post_id", "mirrored").select("label", "fold", vec.alias("x")).toPandas()
    x = np.stack(pdf.x.to_numpy()).astype(np.float32) if len(pdf) else np.zeros((0, 0), np.float32)
    return x, pdf.label.to_numpy().astype(int), pdf.fold.to_numpy().astype(int)


def _scored(spark, name, layer, variant, params, validation, labels, scores, train_rows, seconds, **extra) -> dict:
    return {"algorithm": name, "layer": layer, "variant": variant, "params": params,
            "validation_metric": validation, "test_ap": average_precision(labels, scores),
            "test_area_under_pr": area_under_pr(spark, labels, scores), "train_rows": train_rows,
            "test_rows": int(len(labels)), "seconds": round(seconds, 2), **extra}


def engine(s, rows: int, dim: int) -> str:
    """spark_ml or tasks (svm.engine; auto: tasks when the training rows fit svm.task_max_mb and
    the search is by folds, which is the one the tasks engine runs)."""
    if s.engine != "auto":
        return s.engine
    if s.search != "crossval":
        return "spark_ml"
    return "tasks" if rows * dim * 8 <= s.task_max_mb << 20 else "spark_ml"


# ---------------------------------------------------------------- Spark ML

def spark_linear_svc(spark, s, train, n: int, path: str) -> tuple[dict, object]:
    """Pipeline(StandardScaler, LinearSVC) tuned over s.c_grid; the best model refit on all
    training rows, saved at path. Returns (chosen params + validation metric, PipelineModel)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LinearSVC
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.tuning import (CrossValidator, CrossValidatorModel, ParamGridBuilder, TrainValidationSplit,
                                   TrainValidationSplitModel)

    svc = LinearSVC(featuresCol="scaled", labelCol="label", maxIter=s.max_iter, tol=s.tol,
                    standardization=False)  # the pipeline's scaler already standardised
    pipe = Pipeline(stages=[StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True), svc])
    grid = ParamGridBuilder().addGrid(svc.regParam, [reg_param(c, n) for c in s.c_grid]).build()
    evaluator = BinaryClassificationEvaluator(labelCol="label", rawPredictionCol="rawPrediction",
                                              metricName="areaUnderPR")
    if s.search == "crossval":
        # numFolds must name the fold column's values 0..folds-1 (its default, 3, leaves others empty)
        tuner = CrossValidator(estimator=pipe, estimatorParamMaps=grid, evaluator=evaluator, foldCol="fold",
                               numFolds=s.folds, parallelism=s.parallelism, seed=s.seed)
    else:
        tuner = TrainValidationSplit(estimator=pipe, estimatorParamMaps=grid, evaluator=evaluator,
                                     trainRatio=s.train_ratio, parallelism=s.parallelism, seed=s.seed)
    # The JVM's tuner, not pyspark's: pyspark's fits its `parallelism` models in Python threads
    # that all share one copy of the caller's Spark local properties, so two fits running at once
    # race on the SQL execution ids kept there (make test, Spark 4.0: "NumberFormatException:
    # Cannot parse null string" in SQLExecution.withNewExecutionId0). The JVM's tuner threads
    # each inherit a copy of their own. Same params, folds and metric; svm.search=trainval's one
    # random split is now the JVM's (Dataset.randomSplit with svm.seed).
    fitted = (CrossValidatorModel if s.search == "crossval" else TrainValidationSplitModel)._from_java(
        tuner._to_java().fit(train._jdf))
    metrics = fitted.avgMetrics if s.search == "crossval" else fitted.validationMetrics
    best = int(np.argmax(metrics))
    model = fitted.bestModel
    model.write().overwrite().save(path)
    return {"C": s.c_grid[best], "regParam": reg_param(s.c_grid[best], n), "validation": float(metrics[best]),
            "iterations": model.stages[-1].summary().totalIterations if model.stages[-1].hasSummary else None,
            "engine": "spark_ml"}, model


# ---------------------------------------------------------------- the same search as Spark tasks (small tables)

def hinge_svc(s, c: float):
    """liblinear's LinearSVC with Spark LinearSVC's objective at C = 1 / (regParam n): hinge loss
    and an all but unpenalised intercept (liblinear penalises the intercept as a weight on a
    constant feature of value intercept_scaling)."""
    from sklearn.svm import LinearSVC

    return LinearSVC(C=c, loss="hinge", dual=True, intercept_scaling=100, max_iter=s.sklearn_max_iter,
                     random_state=s.seed)


def linear_svc_model(spark, coefficients: np.ndarray, intercept: float, features: str = "scaled"):
    """A Spark ML LinearSVCModel holding given coefficients (its JVM constructor, which Scala keeps
    package-private and py4j can call): saved, loaded and applied as any Spark ML model."""
    import hashlib

    from pyspark.ml.classification import LinearSVCModel
    from pyspark.ml.common import _py2java
    from pyspark.ml.linalg import DenseVector

    coefficients = np.asarray(coefficients, np.float64)
    uid = "LinearSVC_" + hashlib.blake2b(coefficients.tobytes() + np.float64(intercept).tobytes(),
                                         digest_size=6).hexdigest()
    java = spark._jvm.org.apache.spark.ml.classification.LinearSVCModel(
        uid, _py2java(spark.sparkContext, DenseVector(coefficients)), float(intercept))
    return LinearSVCModel(java).setFeaturesCol(features)


def task_linear_svc(spark, s, train, n: int, path: str) -> tuple[dict, object]:
    """The Spark LinearSVC search for training rows that fit one task (svm.engine=tasks): one
    Spark job whose tasks each fit one (C, fold) pair with liblinear on the broadcast rows,
    scaled within the fold as the Pipeline does, scored by average precision; Spark ML's L-BFGS
    runs one Spark job per iteration instead (~40 ms of scheduling each on a small machine,
    whatever the rows). The chosen C is refit on the rows scaled by a Spark StandardScaler and
    saved as the same PipelineModel (StandardScalerModel + LinearSVCModel) as the spark_ml engine."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import StandardScaler

    x, y, fold = _arrays(train, "features")
    folds = sorted(set(fold.tolist()))
    data = spark.sparkContext.broadcast((x, y, fold))

    def fit(jobs):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler as Scaler

        x, y, fold = data.value
        for c, f in jobs:
            held = fold == f
            if len(set(y[~held].tolist())) < 2 or len(set(y[held].tolist())) < 2:
                yield c, f, None  # a fold without both classes on both sides says nothing about C
                continue
            pipe = make_pipeline(Scaler(), hinge_svc(s, c)).fit(x[~held], y[~held])
            yield c, f, average_precision(y[held], pipe.decision_function(x[held]))

    jobs = [(c, f) for c in s.c_grid for f in folds]
    slots = max(1, min(len(jobs), spark.sparkContext.defaultParallelism))  # a task per core, not per fit
    got = spark.sparkContext.parallelize(jobs, slots).mapPartitions(fit).collect()
    data.destroy()
    mean = {c: np.mean(v) if (v := [a for cc, _, a in got if cc == c and a is not None]) else -1.0 for c in s.c_grid}
    best = max(s.c_grid, key=lambda c: (mean[c], -s.c_grid.index(c)))
    scaler = StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True).fit(train)
    mu, sd = scaler.mean.toArray(), scaler.std.toArray()
    xs = np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1), 0.0)  # what the scaler model computes (0 for constants)
    svc = hinge_svc(s, best).fit(xs, y)
    model = PipelineModel([scaler, linear_svc_model(spark, svc.coef_[0], float(svc.intercept_[0]))])
    model.write().overwrite().save(path)
    return {"C": best, "regParam": reg_param(best, n), "validation": float(mean[best]),
            "iterations": int(np.max(svc.n_iter_)), "engine": "tasks"}, model


def spark_scores(model, test) -> tuple[np.ndarray, np.ndarray]:
    """(labels, LinearSVC margins) of the test rows."""
    from pyspark.ml.functions import vector_to_array

    pdf = model.transform(test).select("label", vector_to_array("rawPrediction")[1].alias("score")).toPandas()
    return pdf.label.to_numpy().astype(int), pdf.score.to_numpy()


# ---------------------------------------------------------------- MLlib (the original's)

def _points(df):
    from pyspark.mllib.linalg import Vectors
    from pyspark.mllib.regression import LabeledPoint

    return df.select("label", "fold", "scaled").rdd.map(
        lambda r: (int(r.fold), LabeledPoint(float(r.label), Vectors.dense(r.scaled.toArray()))))


def mllib_sgd(spark, s, train, test) -> dict:
    """SVMWithSGD over s.sgd_reg_params x s.sgd_steps, chosen by mean areaUnderPR over the
    folds (several trainings at a time), refit on all training rows; scored on the test rows.
    The features are standardised as for Spark ML (the original gave it raw activations)."""
    from pyspark.ml.feature import StandardScaler
    from pyspark.mllib.classification import SVMWithSGD
    from pyspark.mllib.evaluation import BinaryClassificationMetrics

    t0 = time.perf_counter()
    scaler = StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True).fit(train)
    points = _points(scaler.transform(train)).persist()
    folds = sorted(points.map(lambda p: p[0]).distinct().collect())

    def fit(data, reg, step):
        m = SVMWithSGD.train(data.map(lambda p: p[1]), iterations=s.sgd_iterations, step=step, regParam=reg,
                             intercept=True)
        m.clearThreshold()
        return m

    def validate(job):
        reg, step, f = job
        m = fit(points.filter(lambda p, f=f: p[0] != f), reg, step)
        pairs = points.filter(lambda p, f=f: p[0] == f).map(lambda p: (float(m.predict(p[1].features)), p[1].label))
        return BinaryClassificationMetrics(pairs).areaUnderPR

    grid = [(r, st) for r in s.sgd_reg_params for st in s.sgd_steps]
    jobs = [(r, st, f) for r, st in grid for f in folds]
    with ThreadPoolExecutor(s.parallelism) as pool:
        got = list(pool.map(validate, jobs))
    mean = {g: float(np.mean([m for j, m in zip(jobs, got) if j[:2] == g])) for g in grid}
    reg, step = max(grid, key=lambda g: (mean[g], -grid.index(g)))
    model = fit(points, reg, step)
    scored = _points(scaler.transform(test)).map(lambda p: (float(model.predict(p[1].features)), p[1].label)).collect()
    points.unpersist()
    scores, labels = np.array([a for a, _ in scored]), np.array([b for _, b in scored]).astype(int)
    return {"params": {"regParam": reg, "step": step, "iterations": s.sgd_iterations}, "validation": mean[(reg, step)],
            "labels": labels, "scores": scores, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- scikit-learn, on the driver

def sklearn_linear_svc(s, x, y, fold) -> tuple[dict, object]:
    """StandardScaler + hinge-loss LinearSVC over s.c_grid, GridSearchCV on the given folds
    (PredefinedSplit), metric average precision; refit on all rows."""
    from joblib import parallel_config
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    # hinge loss and an all but unpenalised intercept (liblinear penalises the intercept as a
    # weight on a constant feature of value intercept_scaling): Spark's LinearSVC objective.
    pipe = make_pipeline(StandardScaler(), LinearSVC(loss="hinge", dual=True, intercept_scaling=100,
                                                     max_iter=s.sklearn_max_iter, random_state=s.seed))
    search = GridSearchCV(pipe, {"linearsvc__C": list(s.c_grid)}, scoring="average_precision",
                          cv=PredefinedSplit(fold), n_jobs=s.parallelism, refit=True)
    with parallel_config(backend="threading"):  # liblinear releases the GIL; no copies of X
        search.fit(x, y)
    return {"C": search.best_params_["linearsvc__C"], "validation": float(search.best_score_)}, search.best_estimator_


def sklearn_forest(s, x, y) -> object:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=s.rf_trees, n_jobs=-1, random_state=s.seed).fit(x, y)


# ---------------------------------------------------------------- the job

def _features(spark, cfg):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from core.lake import Lake, read_table

    s = cfg.svm
    feats = read_table(spark, Lake(cfg.lake), "features")
    present = {r["layer"] for r in feats.select("layer").distinct().collect()}
    missing = [l for l in s.layers if l not in present]
    if missing:
        raise UnusableInput(f"the features table has no {', '.join(missing)} rows (it has {sorted(present)}): run "
                            f"jobs/extract_features.py with features.layers including them, or set svm.layers")
    fold = F.pmod(F.xxhash64("post_id", F.lit(s.seed)), F.lit(s.folds)).cast("int")
    return feats.where(F.col("layer").isin(list(s.layers))).select(
        "post_id", "split", "model", "weights", "layer", "mirrored", F.col("label").cast("double").alias("label"), "vector",
        array_to_vector("vector").alias("features"), fold.alias("fold"))


def _check(counts: dict, layer: str) -> None:
    """Both classes in the training rows and a labelled test split, else a clear error."""
    train = {k[2]: v for k, v in counts.items() if k[0] == layer and k[1] and k[3] is False}
    test = {k[2]: v for k, v in counts.items() if k[0] == layer and not k[1] and k[3] is False}
    if len([c for c in (0.0, 1.0) if train.get(c)]) < 2:
        raise UnusableInput(f"{layer}: the training rows (train + val splits) hold one class only "
                            f"({ {int(k): v for k, v in train.items()} }): a classifier needs good and bad images; "
                            "check the likability labels and the face filter")
    if not sum(test.values()):
        raise UnusableInput(f"{layer}: the test split has no images: average precision needs held-out images "
                            "(dataset.train + dataset.val < 1)")


def _usable(rows, first_layer: str):
    """(the labelled rows with finite features, the rejects: an image with a NaN or infinite value
    in any of its rows, whole, since Spark ML would fail on it; an image without a label)."""
    from pyspark.sql import functions as F

    from core.lake import union_all
    from core.schemas import Reason

    non_finite = rows.where(F.exists("vector", lambda x: F.isnan(x) | (F.abs(x) == float("inf")))) \
        .select("post_id").distinct()
    labelled = rows.join(non_finite, "post_id", "left_anti")
    unlabelled = labelled.where(F.col("label").isNull() & ~F.col("mirrored") & (F.col("layer") == first_layer))
    rejects = union_all([
        non_finite.select("post_id", F.lit(Reason.NON_FINITE_FEATURES.value).alias("reason"),
                          F.lit("its features hold NaN or infinite values").alias("detail")),
        unlabelled.select("post_id", F.lit(Reason.NO_LABEL.value).alias("reason"),
                          F.lit("the features row has no label: it cannot train or test a classifier").alias("detail"))])
    return labelled.where(F.col("label").isNotNull()), rejects


def _fit_layer(spark, s, feats, counts: dict, layer: str, variants: tuple, dim: int, models: str):
    """The classifiers on one layer's features, each variant (normal; flipped+normal): the Spark
    LinearSVC (saved under models/) and the svm.baselines: MLlib's SGD (normal only) and, up to
    svm.driver_max_rows training rows, scikit-learn's LinearSVC and random forest. (results,
    skipped with why)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    is_train = F.col("split") != "test"
    results, skipped = [], []
    test = feats.where(~is_train & (F.col("layer") == layer) & ~F.col("mirrored")).persist(StorageLevel.MEMORY_AND_DISK)
    local_test = None  # the test rows on the driver, collected once per layer for scikit-learn
    for variant in variants:
        rows = feats.where(is_train & (F.col("layer") == layer))
        if variant == "normal":
            rows = rows.where(~F.col("mirrored"))
        n = sum(v for k, v in counts.items() if k[0] == layer and k[1] and (variant != "normal" or not k[3]))
        train = rows.repartition(max(1, math.ceil(n * dim * 8 / PARTITION_BYTES))).persist(
            StorageLevel.MEMORY_AND_DISK)
        t0 = time.perf_counter()
        fit = task_linear_svc if engine(s, n, dim) == "tasks" else spark_linear_svc
        params, model = fit(spark, s, train, n, f"{models}/{model_dir(layer, variant)}")
        labels, scores = spark_scores(model, test)
        results.append(_scored(spark, "spark_linearsvc", layer, variant, params, params.pop("validation"), labels,
                               scores, n, time.perf_counter() - t0, model=model_dir(layer, variant)))
        if variant == "normal" and "mllib_svmwithsgd" in s.baselines:
            got = mllib_sgd(spark, s, train, test)
            results.append(_scored(spark, "mllib_svmwithsgd", layer, variant, got["params"], got["validation"],
                                   got["labels"], got["scores"], n, got["seconds"]))
        local = [a for a in ("sklearn_linearsvc", "sklearn_random_forest") if a in s.baselines]
        if local and n > s.driver_max_rows:
            skipped += [{"algorithm": a, "layer": layer, "variant": variant,
                         "why": f"{n} training rows > svm.driver_max_rows={s.driver_max_rows}"} for a in local]
        elif local:
            x, y, fold = _arrays(train)
            local_test = local_test or _arrays(test)
            xt, yt, _ = local_test
            if "sklearn_linearsvc" in local:
                t0 = time.perf_counter()
                params, svc = sklearn_linear_svc(s, x, y, fold)
                results.append(_scored(spark, "sklearn_linearsvc", layer, variant, {"C": params["C"]},
                                       params["validation"], yt, svc.decision_function(xt), n,
                                       time.perf_counter() - t0))
            if "sklearn_random_forest" in local:
                t0 = time.perf_counter()
                forest = sklearn_forest(s, x, y)
                results.append(_scored(spark, "sklearn_random_forest", layer, variant,
                                       {"n_estimators": s.rf_trees}, None, yt, forest.predict_proba(xt)[:, 1], n,
                                       time.perf_counter() - t0))
        train.unpersist()
    test.unpersist()
    return results, skipped


def train_svm(spark, cfg):
    """features -> the AP table (reports/likability_svm) and the Spark models (models/likability_svm)."""
    from pyspark.sql import functions as F

    from core import storage
    from core.lake import Lake, Summary, begin_output, close_output, write_rejected

    s = cfg.svm
    lake = Lake(cfg.lake)
    report, models = lake.report(MODEL), lake.model(MODEL)
    feats, rejects = _usable(_features(spark, cfg), s.layers[0])
    is_train = F.col("split") != "test"
    counts = {(r["layer"], r["train"], r["label"], r["mirrored"]): int(r["count"]) for r in
              feats.groupBy("layer", is_train.alias("train"), "label", "mirrored").count().collect()}
    for layer in s.layers:
        _check(counts, layer)
    # the features can train and test a classifier: only now are the previous models and report replaced
    begin_output(spark, models)
    begin_output(spark, report)
    rejected = write_rejected(spark, lake, "train_svm", rejects)
    mirrored = any(k[3] for k in counts)
    variants = VARIANTS if mirrored else VARIANTS[:1]
    dim = len(feats.select("vector").first()["vector"])
    results, skipped = [], []
    for layer in s.layers:
        got, missed = _fit_layer(spark, s, feats, counts, layer, variants, dim, models)
        results += got
        skipped += missed

    spark_results = [r for r in results if r["algorithm"] == "spark_linearsvc"]
    best = max(spark_results, key=lambda r: r["validation_metric"])  # chosen on validation, never on test
    test_rows = {r["layer"]: r["test_rows"] for r in spark_results}
    positive_rate = {layer: counts.get((layer, False, 1.0, False), 0) / test_rows[layer] for layer in s.layers}
    body = {"results": results, "skipped": skipped, "published": [
        {"layer": k[0], "algorithm": k[1], "variant": k[2], "test_ap": v} for k, v in PUBLISHED.items()],
        "test_positive_rate": positive_rate, "search": s.search, "folds": s.folds, "c_grid": list(s.c_grid),
        "best": {k: best[k] for k in ("layer", "variant", "model", "params", "validation_metric", "test_ap")},
        "features": _provenance(spark, lake, feats), "variants": list(variants), "rf_trees": s.rf_trees,
        "baselines": list(s.baselines),
        "best_test_ranking": _test_ranking(feats, models, best)}
    md = markdown(body)
    storage.write_bytes(spark, f"{report}/metrics.json", json.dumps(body, indent=1, default=float).encode())
    storage.write_bytes(spark, f"{report}/metrics.md", md.encode())
    print(md)
    images = sum(v for k, v in counts.items() if k[0] == s.layers[0] and not k[3])
    extra = {"report": report, "best": body["best"], "features": body["features"], "layers": list(s.layers),
             "models": {model_dir(r["layer"], r["variant"]): r["model"] for r in spark_results},
             "test_positive_rate": positive_rate,
             "test_ap": {f"{r['algorithm']}/{r['layer']}/{r['variant']}": r["test_ap"] for r in results}}
    # The report is this stage's other output: mark it complete too.
    close_output(spark, {"stage": "train_svm", "output": report, "models": models, "best": body["best"]})
    return Summary(stage="train_svm", input_rows=images + sum(rejected.values()), output_rows=images,
                   rejected=rejected, output=models, extra=extra)


def _test_ranking(feats, models: str, best: dict) -> list[list]:
    """The best model's test images (its layer, not mirrored) ranked by its margin, highest first
    (ties by post_id): [post_id, label, margin], what the report's top and bottom sheets show."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    test = feats.where((F.col("layer") == best["layer"]) & ~F.col("mirrored") & (F.col("split") == "test"))
    model = PipelineModel.load(f"{models}/{best['model']}")
    scored = model.transform(test.withColumn("features", array_to_vector("vector"))) \
        .select("post_id", "label", vector_to_array("rawPrediction")[1].alias("s")) \
        .orderBy(F.col("s").desc(), "post_id").collect()
    return [[r["post_id"], r["label"], r["s"]] for r in scored]


def _provenance(spark, lake, feats) -> dict:
    """Which network made the features (a scoring job must compute the same ones)."""
    from core.lake import read_summary

    rows = feats.select("model", "weights").distinct().collect()
    made = read_summary(spark, lake.table("features"))
    return {"model": sorted({r["model"] for r in rows}), "weights": sorted({r["weights"] for r in rows}),
            "seed": made.get("seed"), "normalisation": made.get("normalisation"),
            "weights_sha256": made.get("weights_sha256")}


def markdown(body: dict) -> str:
    """The published table with our figures beside, then the chosen hyper-parameters."""
    got = {(r["layer"], r["algorithm"], r["variant"]): r for r in body["results"]}
    skipped = {(r["layer"], r["algorithm"], r["variant"]): r["why"] for r in body["skipped"]}
    layers = sorted({r["layer"] for r in body["results"]}, key=lambda l: ("fc7", "fc6").index(l) if l in ("fc7", "fc6") else 9)
    variants = body["variants"][::-1]  # flipped+normal first, as published

    def cell(layer, algo, variant):
        r = got.get((layer, algo, variant))
        ours = f"{r['test_ap']:.3f}" if r else ("skipped" if (layer, algo, variant) in skipped else "-")
        pub = PUBLISHED.get((layer, algo, variant))
        return ours + (f" ({pub:.3f})" if pub is not None else "")

    title = {**TITLES, "sklearn_random_forest": f"{TITLES['sklearn_random_forest']} {body['rf_trees']}"}
    head = "| features | " + " | ".join(
        f"{title[a]} ({' / '.join(variants) if a != 'mllib_svmwithsgd' else 'normal'})" for a in ALGORITHMS) + " |"
    lines = [head, "|" + " --- |" * (len(ALGORITHMS) + 1)]
    for layer in layers:
        cells = [" / ".join(cell(layer, a, v) for v in (variants if a != "mllib_svmwithsgd" else ["normal"]))
                 for a in ALGORITHMS]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    for layer in sorted({k[0] for k in PUBLISHED} - set(layers), key=("fc7", "fc6").index):  # features not ours
        cells = [" / ".join(f"({PUBLISHED[(layer, a, v)]:.3f})" if (layer, a, v) in PUBLISHED else "-"
                            for v in (variants if a != "mllib_svmwithsgd" else ["normal"])) for a in ALGORITHMS]
        lines.append(f"| {layer}, published (the original's AlexNet) | " + " | ".join(cells) + " |")
    rate = ", ".join(f"{l} {v:.3f}" for l, v in body["test_positive_rate"].items())
    detail = ["| layer | variant | algorithm | chosen | validation metric | test AP | test areaUnderPR | "
              "train rows | test rows | seconds |", "|" + " --- |" * 10]
    for r in body["results"]:
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        val = "-" if r["validation_metric"] is None else f"{r['validation_metric']:.3f}"
        detail.append(f"| {r['layer']} | {r['variant']} | {TITLES[r['algorithm']]} | {chosen} | {val} | "
                      f"{r['test_ap']:.3f} | {r['test_area_under_pr']:.3f} | {r['train_rows']} | {r['test_rows']} | "
                      f"{r['seconds']} |")
    notes = [f"- {TITLES[r['algorithm']]} {r['layer']} {r['variant']}: skipped, {r['why']}" for r in body["skipped"]]
    notes += [f"- {TITLES[a]}: not fit (svm.baselines)" for a in ALGORITHMS
              if a != "spark_linearsvc" and a not in body["baselines"]]
    feats = body["features"]
    return ("Likability classifiers: average precision on the test split (scikit-learn's, non-interpolated), ours "
            f"(published in parentheses). Features: {', '.join(feats['model'])}, weights {', '.join(feats['weights'])}"
            + (" (random init: this shows the pipeline, not ImageNet quality)" if feats["weights"] == ["none"] else "")
            + f". Positive rate of the test split (the AP of a random ranking): {rate}.\n\n" + "\n".join(lines)
            + f"\n\nSelection: {body['search']}"
            + (f" over {body['folds']} folds by post_id" if body["search"] == "crossval" else "")
            + f", C grid {body['c_grid']} (Spark regParam = 1 / (C n)). Best Spark model (by validation): "
            f"{body['best']['layer']} {body['best']['variant']} -> models/likability_svm/{body['best']['model']}\n\n"
            + "\n".join(detail) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else ""))
