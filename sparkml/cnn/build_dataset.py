"""build_dataset: the Petastorm training datasets and their Unischemas (declared once, here,
beside the writer; the torch loader, dl.data, reads them back from each dataset's metadata).

    <lake>/datasets/<name>/{train,val,test}   Petastorm datasets (Parquet + Unischema metadata)
    <lake>/datasets/<name>/labels.json         label index -> name (a city; bad / good for likability)
    <lake>/datasets/<name>/_SUMMARY.json

The prepared JPEG bytes go into the image column as they are: Petastorm's
CompressedImageCodec('jpeg') decodes them at read time, so nothing is re-encoded.
"""

from __future__ import annotations

import json
import math

import numpy as np
from petastorm.codecs import CompressedImageCodec, NdarrayCodec, ScalarCodec
from petastorm.etl.dataset_metadata import materialize_dataset
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core.config import Config, ConfigError
from core.lake import SUMMARY_FILE, Lake, Summary, begin_output, read_summary, read_table, union_all, write_rejected
from core.schemas import SPLITS, Reason
from core.splits import assign_split
from sparkml.images.dedup import unique_images


def cities_schema(size: int, num_topics: int | None = None) -> Unischema:
    """The city classifier's dataset: a size x size RGB image, its post and its city label;
    with caption topics (infer_topics), also the topic distribution, the GoogLeNet regressor's
    target (None for a post whose caption had no words)."""
    fields = [
        UnischemaField("post_id", np.str_, (), ScalarCodec(T.StringType()), False),
        UnischemaField("image", np.uint8, (size, size, 3), CompressedImageCodec("jpeg"), False),
        UnischemaField("city", np.str_, (), ScalarCodec(T.StringType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(T.IntegerType()), False),
    ]
    if num_topics:
        fields.append(UnischemaField("topics", np.float32, (num_topics,), NdarrayCodec(), True))
    return Unischema("CitiesSchema", fields)


def _ndarray_bytes(col: str, field: UnischemaField):
    """array<float> -> the field's NdarrayCodec encoding (what make_reader decodes), null stays null."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    codec = field.codec

    def one(v):
        return None if v is None else bytes(codec.encode(field, np.asarray(v, field.numpy_dtype)))

    def encode(values):
        return values.map(one)

    encode.__annotations__ = {"values": pd.Series, "return": pd.Series}  # real types: this module defers hints
    return pandas_udf(encode, T.BinaryType())(F.col(col))


def likability_schema(size: int) -> Unischema:
    """The likability classifier's dataset: image, label 1 = good / 0 = bad, the likes/followers ratio."""
    return Unischema("LikabilitySchema", [
        UnischemaField("post_id", np.str_, (), ScalarCodec(T.StringType()), False),
        UnischemaField("image", np.uint8, (size, size, 3), CompressedImageCodec("jpeg"), False),
        UnischemaField("label", np.int32, (), ScalarCodec(T.IntegerType()), False),
        UnischemaField("ratio", np.float64, (), ScalarCodec(T.DoubleType()), False),
    ])


def materialize(spark: SparkSession, df: DataFrame, url: str, schema: Unischema, row_group_mb: int,
                min_row_groups: int) -> int:
    """Write df (columns = schema fields) as a Petastorm dataset with at least min_row_groups
    row groups (so every training rank gets several), else one per row_group_mb."""
    stats = df.agg(F.count("*").alias("n"), F.sum(F.length("image")).alias("bytes")).first()
    n = int(stats["n"])
    parts = max(1, min(n, max(min_row_groups, math.ceil((stats["bytes"] or 0) / (row_group_mb << 20)))))
    with materialize_dataset(spark, url, schema, row_group_mb):
        (df.select(*schema.fields.keys()).repartition(parts, "post_id")
         .sortWithinPartitions("post_id").write.mode("overwrite").parquet(url))
    return n


def _reject(df: DataFrame, reason: Reason, detail: str) -> DataFrame:
    return df.select("post_id", F.lit(reason.value).alias("reason"), F.lit(detail).alias("detail"))


def image_side(spark: SparkSession, lake: Lake) -> int:
    """The side of the prepared images as the images table was written (its summary), not as
    prepare.size says now: a dataset must not claim a shape its JPEGs do not have."""
    return int(read_summary(spark, lake.table("images"))["size"])


def _cities(spark: SparkSession, lake: Lake, images: DataFrame, cfg: Config):
    """(rows with city + label, rejects, label names, Unischema)."""
    posts = read_table(spark, lake, "posts").select("post_id", "city", "split")
    joined = images.join(posts, "post_id")
    has_city = F.col("city").isNotNull() & (F.trim("city") != "")
    labelled = joined.where(has_city)
    cities = sorted(r["city"] for r in labelled.select("city").distinct().collect())
    index = spark.createDataFrame([(c, i) for i, c in enumerate(cities)], "city string, label int")
    labelled = labelled.join(F.broadcast(index), "city")
    num_topics = None
    if storage.exists(spark, f"{lake.table('topics')}/{SUMMARY_FILE}"):  # caption topics: the regression target
        topics = read_table(spark, lake, "topics")
        first = topics.select(F.size("topics").alias("k")).first()
        num_topics = int(first["k"]) if first else None
    schema = cities_schema(image_side(spark, lake), num_topics)
    if num_topics:
        labelled = labelled.join(topics, "post_id", "left").withColumn(
            "topics", _ndarray_bytes("topics", schema.fields["topics"]))
    return (labelled, _reject(joined.where(~has_city), Reason.NO_LABEL, "post has no city"), cities, schema)


def _likability(spark: SparkSession, lake: Lake, images: DataFrame, cfg: Config):
    """Images with a likability label whose best face passes faces.min_confidence."""
    labels = read_table(spark, lake, "likability_labels").select("post_id", "label", "ratio")
    faces = read_table(spark, lake, "faces").select("post_id", "best_confidence")
    joined = images.join(labels, "post_id", "left").join(faces, "post_id", "left")
    passes = F.coalesce(F.col("best_confidence"), F.lit(0.0)) >= cfg.faces.min_confidence
    rejects = union_all([
        _reject(joined.where(F.col("label").isNull()), Reason.NO_LABEL,
                "no likability label (rejected or filtered out by filter_followers)"),
        _reject(joined.where(F.col("label").isNotNull() & ~passes), Reason.NO_FACE,
                f"no face with confidence >= faces.min_confidence {cfg.faces.min_confidence}"),
    ])
    return (joined.where(F.col("label").isNotNull() & passes), rejects, ["bad", "good"],
            likability_schema(image_side(spark, lake)))


def build_dataset(spark: SparkSession, cfg: Config) -> Summary:
    """Unique images + labels -> <lake>/datasets/<name>/{train,val,test} + labels.json."""
    lake = Lake(cfg.lake)
    d = cfg.dataset
    if d.train + d.val >= 1:
        raise ConfigError(f"dataset.train + dataset.val must be < 1 (got {d.train} + {d.val})")
    name = d.name or d.labels
    root = lake.dataset(name)
    begin_output(spark, root)
    images = unique_images(spark, lake).select("post_id", "image")
    labelled, rejects, label_names, schema = {"cities": _cities, "likability": _likability}[d.labels](
        spark, lake, images, cfg)
    rows = assign_split(labelled, d.train, d.val, d.respect_source_split).persist()
    counts = {}
    for split in SPLITS:
        groups = d.ranks * (d.row_groups_per_rank if split == "train" else 1)
        counts[split] = materialize(spark, rows.where(F.col("split") == split), f"{root}/{split}", schema,
                                    d.row_group_mb, groups)
    by_label = {label_names[r["label"]]: int(r["count"]) for r in rows.groupBy("label").count().collect()}
    if len(by_label) < 2:
        print(f"build_dataset: warning: {name} holds one class only ({sorted(by_label) or 'none'}): no classifier can "
              "be trained on it (train_cnn refuses it)", flush=True)
    rows.unpersist()
    storage.write_bytes(spark, f"{root}/labels.json", json.dumps(label_names, indent=1).encode())
    rejected = write_rejected(spark, lake, f"build_dataset_{name}", rejects)
    return Summary(stage="build_dataset", input_rows=images.count(), output_rows=sum(counts.values()),
                   rejected=rejected, output=root,
                   extra={"splits": counts, "labels": label_names, "per_label": by_label, "dataset": name})
