"""The Spark LinearSVC search of train_svm against scikit-learn's, at the demo's size and at 100k
training rows, in one Spark session on this machine (issue 28).

Each run tunes C over the grid with 3 folds by post_id and refits the chosen C, as train_svm does:
- ours, engine tasks: one Spark job, a task per core fitting its share of the (C, fold) pairs
  with liblinear on the broadcast rows, the refit written as a Spark ML PipelineModel;
- ours, engine spark_ml: Spark ML Pipeline(StandardScaler, LinearSVC) under CrossValidator
  (distributed L-BFGS, one Spark job per iteration), the refit written the same way;
- baseline: scikit-learn's GridSearchCV over Pipeline(StandardScaler, LinearSVC) on the driver
  (threads), the rows collected first (that collect is counted), nothing written.
Test AP beside each (the same test rows), so the engines can be seen to agree.

demo: the demo lake's features table (`make demo` first; MobileNetV2 prelogit, 1280-d), its
train + val rows of the normal variant. 100k: generated rows of the same width: two Gaussian
classes whose means are 2 standard deviations apart along a random direction (a linear signal
an SVM can find), post_ids hashed into the same folds.

    .venv/bin/python bench/svm.py [--lake data/lake] [--rows 100000] [--grid 1e-4 1e-2]
"""

from __future__ import annotations

import argparse
import math
import time

from _common import ROOT, header

import numpy as np  # noqa: E402


def session():
    from core.config import load_config
    from core.session import get_session

    cfg = load_config(ROOT / "conf" / "local.yaml", ["spark.driver.memory=12g", "progress.interval=0"])
    spark = get_session(cfg, app_name="bench-svm")
    spark.sparkContext.setLogLevel("ERROR")
    return spark, cfg


def demo_rows(spark, cfg, lake: str):
    from pyspark.sql import functions as F

    from sparkml.likability import train_svm as svm

    cfg = cfg.model_copy(update={"lake": lake})
    feats = svm._features(spark, cfg).where(~F.col("mirrored"))
    return feats.where(F.col("split") != "test"), feats.where(F.col("split") == "test")


def generated_rows(spark, s, n: int, dim: int, seed: int = 0):
    """n training + n/10 test rows: x ~ N(0, I) + (label - 0.5) * 2 * u, u a random unit direction
    (the classes' means 2 standard deviations apart along u: about 84% separable by a hyperplane)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)

    def rows(count: int, split: str, offset: int):
        parts = max(2, math.ceil(count * dim * 4 / (64 << 20)))
        per = math.ceil(count / parts)

        def make(i):
            r = np.random.default_rng(seed * 1000 + offset + i)
            m = min(per, count - i * per)
            y = r.integers(0, 2, m)
            x = r.normal(size=(m, dim)).astype(np.float32) + ((y - 0.5) * 2.0)[:, None] * u[None, :].astype(np.float32)
            return [(f"{split}{i}-{j}", split, False, float(y[j]), x[j].tolist()) for j in range(m)]

        df = spark.sparkContext.parallelize(range(parts), parts).flatMap(make).toDF(
            "post_id string, split string, mirrored boolean, label double, vector array<float>")
        fold = F.pmod(F.xxhash64("post_id", F.lit(s.seed)), F.lit(s.folds)).cast("int")
        return df.withColumn("features", array_to_vector("vector")).withColumn("fold", fold)

    return rows(n, "train", 0), rows(max(200, n // 10), "test", 10_000)


def measure(spark, s, train, test, label: str, engines: list[str]) -> None:
    from pyspark import StorageLevel

    from sparkml.likability import train_svm as svm

    train = train.repartition(max(1, spark.sparkContext.defaultParallelism)).persist(StorageLevel.MEMORY_AND_DISK)
    test = test.persist(StorageLevel.MEMORY_AND_DISK)
    n, dim = train.count(), len(train.select("vector").first()["vector"])
    test.count()
    print(f"\n## {label}: {n} training rows x {dim} dimensions ({n * dim * 8 / 2**20:.0f} MB as doubles), "
          f"{test.count()} test rows, C grid {list(s.c_grid)}, {s.folds} folds; "
          f"svm.engine=auto would take {svm.engine(s.model_copy(update={'engine': 'auto'}), n, dim)}")
    print("| | seconds (tune + refit) | test AP | C chosen |\n|---|---|---|---|")
    figures = {}
    for name in engines:  # a second run of one engine is warm (its Python workers already started)
        fit = {"tasks": svm.task_linear_svc, "spark_ml": svm.spark_linear_svc}[name]
        t0 = time.perf_counter()
        params, model = fit(spark, s, train, n, f"/tmp/bench-svm-{name}")
        seconds = time.perf_counter() - t0
        labels, scores = svm.spark_scores(model, test)
        run = "warm" if name in figures else "first run"
        figures[name] = seconds
        print(f"| ours, engine {name} (model written; {run}) | {seconds:.2f} | "
              f"{svm.average_precision(labels, scores):.3f} | {params['C']:g} |", flush=True)
    t0 = time.perf_counter()
    x, y, fold = svm._arrays(train)
    params, est = svm.sklearn_linear_svc(s, x, y, fold)
    seconds = time.perf_counter() - t0
    xt, yt, _ = svm._arrays(test)
    figures["sklearn"] = seconds
    print(f"| scikit-learn GridSearchCV on the driver (collect included) | {seconds:.2f} | "
          f"{svm.average_precision(yt, est.decision_function(xt)):.3f} | {params['C']:g} |")
    for name in dict.fromkeys(engines):
        print(f"ratio ours ({name}, {'warm' if engines.count(name) > 1 else 'first run'}) / scikit-learn: "
              f"{figures[name] / figures['sklearn']:.2f}")
    train.unpersist()
    test.unpersist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lake", default=str(ROOT / "data" / "lake"))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--grid", type=float, nargs="+", default=[1e-4, 1e-2])
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    header("train_svm's Spark LinearSVC search against scikit-learn's")
    spark, cfg = session()
    s = cfg.svm.model_copy(update={"c_grid": args.grid})
    if not args.skip_demo:
        train, test = demo_rows(spark, cfg, args.lake)
        measure(spark, s, train, test, "the demo's likability features", ["tasks", "tasks", "spark_ml"])
    if args.rows:
        train, test = generated_rows(spark, s, args.rows, 1280)
        measure(spark, s, train, test, "generated rows", ["spark_ml", "tasks"])


if __name__ == "__main__":
    main()
