"""train_svm on the features of 396 real photos: Spark's LinearSVC and scikit-learn's agree."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED, run_job

PHOTOS = sorted((SHARED / "data" / "photos").glob("*.jpg"))
UNLABELLED = {0, 80, 160, 240, 320}


@pytest.fixture(scope="module")
def photo_features(spark, tmp_path_factory):
    """A lake whose features table holds AlexNet fc7 (random init, also mirrored) of the real
    photos, labelled 1 where the photo is greener than the median (a signal a linear model on
    these features can learn); a third of the photos, by a hash of the name, are the test split.
    Five photos have no label."""
    from pyspark.sql import Row

    from core.lake import Lake, Summary, write_summary, write_table
    from core.schemas import TABLES
    from sparkml.extract_features import extract

    assert len(PHOTOS) == 396, "../shared/data/photos must be beside the repository"
    images = [np.asarray(Image.open(p).convert("RGB").resize((300, 300))) for p in PHOTOS]
    green = np.array([a[..., 1].mean() - a[..., 0].mean() for a in images])
    labels = (green > np.median(green)).astype(int)
    split = ["test" if int(hashlib.md5(p.name.encode()).hexdigest(), 16) % 3 == 0 else "train" for p in PHOTOS]
    rows = []
    for i in range(0, len(images), 64):
        feats = extract(images[i:i + 64], "alexnet", "none", ("fc7",), True)
        for (layer, mirrored), mat in feats.items():
            rows += [Row(post_id=PHOTOS[i + j].stem, split=split[i + j],
                         label=None if (i + j) in UNLABELLED else int(labels[i + j]), model="alexnet",
                         weights="none", layer=layer, mirrored=mirrored, vector=v.tolist()) for j, v in enumerate(mat)]
    lake = Lake(str(tmp_path_factory.mktemp("photo_lake")))
    out = write_table(spark.createDataFrame(rows, TABLES["features"].schema), lake, "features")
    write_summary(spark, Summary(stage="extract_features", input_rows=len(PHOTOS), output_rows=len(PHOTOS), output=out))
    return lake, labels, split


@pytest.mark.slow
def test_spark_and_sklearn_linear_svms_agree_on_the_same_features(spark, photo_features):
    """The same C (Spark regParam = 1/(C n)) on the same folds: test AP within 0.02, for the
    normal and flipped+normal variants; the table's sizes and positive rate are the photos'."""
    from core.lake import read_summary

    lake, labels, split = photo_features
    keep = np.array([i not in UNLABELLED for i in range(len(PHOTOS))])
    test, labels = (np.array(split) == "test")[keep], labels[keep]
    assert run_job("train_svm", "--set", f"lake={lake.root}", "--set", "svm.layers=[fc7]",
                   "--set", "svm.c_grid=[0.0001]", "--set", "svm.baselines=[sklearn_linearsvc]") == 0
    report = json.loads((Path(lake.report("likability_svm").removeprefix("file:")) / "metrics.json").read_text())
    got = {(r["algorithm"], r["variant"]): r for r in report["results"]}
    summary = read_summary(spark, lake.model("likability_svm"))
    assert summary["balanced"] and summary["rejected"] == {"no_label": len(UNLABELLED)}
    assert summary["input_rows"] == len(PHOTOS) and summary["output_rows"] == len(PHOTOS) - len(UNLABELLED)
    assert report["test_positive_rate"]["fc7"] == pytest.approx(labels[test].mean())
    for variant, copies in (("normal", 1), ("flipped+normal", 2)):
        spark_svc, sk_svc = got[("spark_linearsvc", variant)], got[("sklearn_linearsvc", variant)]
        assert spark_svc["train_rows"] == sk_svc["train_rows"] == copies * int((~test).sum())
        assert spark_svc["test_rows"] == int(test.sum()) > 100
        assert abs(spark_svc["test_ap"] - sk_svc["test_ap"]) <= 0.02, (variant, spark_svc["test_ap"], sk_svc["test_ap"])
        assert spark_svc["test_ap"] > labels[test].mean() + 0.2  # the planted signal is learnt


@pytest.mark.slow
def test_the_two_engines_of_the_spark_linear_svc_choose_the_same_c_and_agree(spark, photo_features):
    """svm.engine=tasks (one Spark job, liblinear per (C, fold) task) and spark_ml (CrossValidator
    over Spark ML's L-BFGS) on the same two folds (a third fold cost the test a fifth more CPU and
    checks nothing more): the same C of two, test AP within 0.02 (at C 1e-2 Spark ML's L-BFGS
    stops at maxIter 100 short of the optimum on these features); the tasks engine's saved
    PipelineModel is a Spark ML model like the other (reloaded, it scores the
    test rows with the AP the report gives)."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F
    from sklearn.metrics import average_precision_score

    lake, _, _ = photo_features
    got = {}
    for engine in ("tasks", "spark_ml"):
        assert run_job("train_svm", "--set", f"lake={lake.root}", "--set", "svm.layers=[fc7]",
                       "--set", "svm.c_grid=[0.00001,0.0001]", "--set", "svm.baselines=[]",
                       "--set", "svm.folds=2", "--set", f"svm.engine={engine}") == 0
        report = json.loads((Path(lake.report("likability_svm").removeprefix("file:")) / "metrics.json").read_text())
        assert {r["algorithm"] for r in report["results"]} == {"spark_linearsvc"}  # svm.baselines=[]: no other fit
        assert "MLlib SVMWithSGD: not fit (svm.baselines)" in \
            (Path(lake.report("likability_svm").removeprefix("file:")) / "metrics.md").read_text()
        got[engine] = {r["variant"]: r for r in report["results"] if r["algorithm"] == "spark_linearsvc"}
        assert {r["params"]["engine"] for r in got[engine].values()} == {engine}
        if engine == "tasks":
            r = got[engine]["normal"]
            test = spark.read.parquet(lake.table("features")).where("layer = 'fc7' and not mirrored and split = 'test' "
                                                                    "and label is not null")
            scored = PipelineModel.load(f"{lake.model('likability_svm')}/{r['model']}").transform(test.withColumn("features", array_to_vector("vector"))) \
                .select(F.col("label").cast("int").alias("y"), vector_to_array("rawPrediction")[1].alias("s")).toPandas()
            assert average_precision_score(scored.y, scored.s) == pytest.approx(r["test_ap"])
    for variant in ("normal", "flipped+normal"):
        a, b = got["tasks"][variant], got["spark_ml"][variant]
        assert a["params"]["C"] == b["params"]["C"] and abs(a["test_ap"] - b["test_ap"]) <= 0.02, (variant, a, b)
