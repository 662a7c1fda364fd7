"""The InstaCities1M layout (img_resized_1M/cities_instagram/<city>/<id>.jpg with captions
beside in captions_resized_1M/) and the `classes` layout (a folder per label): file listings ->
post rows, decided on the listing alone."""

from __future__ import annotations


from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core import storage
from core.config import Config, ConfigError
from core.lake import union_all
from core.schemas import CAP_DIR, IMAGE_EXTENSIONS, IMG_DIR, SPLIT_CAP, SPLIT_IMG, SPLITS, Reason
from sparkml.ingest.posts import first_per_post, rejects_of


def _instacities_roots(spark: SparkSession, root: str) -> tuple[str, str, bool]:
    root = storage.qualify(root).rstrip("/")
    if storage.is_dir(spark, f"{root}/{IMG_DIR}"):
        return f"{root}/{IMG_DIR}", f"{root}/{CAP_DIR}", False
    if storage.is_dir(spark, f"{root}/{SPLIT_IMG}"):
        return f"{root}/{SPLIT_IMG}", f"{root}/{SPLIT_CAP}", True
    raise ConfigError(f"source.path {root}: neither {IMG_DIR}/ nor {SPLIT_IMG}/<split>/ found "
                      "(source.layout=instacities)")


def _class_roots(spark: SparkSession, root: str) -> tuple[str, None, bool]:
    """A labelled folder: <root>/<class>/<image>, or <root>/<split>/<class>/<image> when it has
    a train/ folder; no captions."""
    root = storage.qualify(root).rstrip("/")
    if not storage.is_dir(spark, root):
        raise ConfigError(f"source.path {root} is not a folder (source.layout=classes: <class>/<image> or "
                          "<train|val|test>/<class>/<image>)")
    return root, None, storage.is_dir(spark, f"{root}/train")


def _listing(spark: SparkSession, root: str, with_split: bool, cfg: Config, class_ids: bool = False) -> DataFrame:
    """Files under root as (uri, size, split, city, post_id, ext, ok); ok = the layout's shape.
    post_id is the file's name without extension, or with class_ids <class>/<name> (a user's
    class folders may repeat a file name)."""
    files = storage.list_files(root, cfg.s3.endpoint, cfg.s3.region)
    df = spark.createDataFrame(files or [], "uri string, size long")
    parts = F.split(F.substring("uri", len(root) + 2, 1 << 20), "/")
    name = F.element_at(parts, -1)
    ext = F.lower(F.regexp_extract(name, r"\.([A-Za-z0-9]+)$", 1))
    split = F.element_at(parts, 1) if with_split else F.lit(None).cast("string")
    stem = F.regexp_replace(name, r"\.[A-Za-z0-9]+$", "")
    post_id = F.concat_ws("/", F.element_at(parts, -2), stem) if class_ids else stem
    ok = (F.size(parts) == (3 if with_split else 2)) & ~stem.startswith(".") & (stem != "")
    if with_split:
        ok = ok & split.isin(*SPLITS)
    return df.select("uri", "size", split.alias("split"), F.element_at(parts, -2).alias("city"),
                     post_id.alias("post_id"), ext.alias("ext"), ok.alias("ok"))


def ingest_instacities(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(todo, rejects, input_keys) of InstaCities1M folders or a labelled folder (source.layout
    classes: the class folder's name is the post's city column, the label build_dataset uses):
    todo rows go to the content pass."""
    classes = cfg.source.layout == "classes"
    img_root, cap_root, with_split = (_class_roots if classes else _instacities_roots)(spark, cfg.source.path)
    meta = _listing(spark, img_root, with_split, cfg, class_ids=classes)
    is_image = F.col("ok") & F.col("ext").isin(*IMAGE_EXTENSIONS)
    good = meta.where(is_image)
    kept, dropped = first_per_post(good, "uri")
    keys = ["split", "city", "post_id"] if with_split else ["city", "post_id"]
    all_caps = (_listing(spark, cap_root, with_split, cfg) if cap_root else meta.limit(0)) \
        .where(F.col("ok") & (F.col("ext") == "txt"))
    # 1.txt and 1.TXT for one post: one caption is kept (a lowercase .txt first), the others rejected
    caps, extra_caps = first_per_post(all_caps.withColumn("uri_order", F.concat(
        (~F.col("uri").endswith(".txt")).cast("int").cast("string"), F.col("uri"))), "uri_order", tuple(keys))
    caps, extra_caps = caps.drop("uri_order"), extra_caps.drop("uri_order")
    orphans = caps.join(good.select(*keys), keys, "left_anti")
    rejects = union_all([
        rejects_of(meta.where(~is_image).withColumn("post_id", F.lit(None).cast("string")),
                 Reason.UNRECOGNIZED_FILE, F.col("uri")),
        rejects_of(dropped, Reason.DUPLICATE_POST, F.concat(F.col("uri"), F.lit(" duplicates "), F.col("kept_as"))),
        rejects_of(kept.where("size = 0"), Reason.EMPTY_IMAGE, F.col("uri")),
        rejects_of(orphans, Reason.IMAGE_MISSING, F.concat(F.lit("caption "), F.col("uri"), F.lit(" has no image"))),
        rejects_of(extra_caps.withColumn("post_id", F.lit(None).cast("string")), Reason.UNRECOGNIZED_FILE,
                 F.concat(F.col("uri"), F.lit(": a second caption file for one post (kept "),
                          F.substring("kept_as", 2, 1 << 20), F.lit(")"))),
    ])
    todo = (kept.where("size > 0")
            .join(caps.select(*keys, F.col("uri").alias("caption_uri")), keys, "left")
            .select("post_id", "city", "split", F.lit(None).cast("string").alias("caption"), "caption_uri",
                    *[F.lit(None).cast(t).alias(c) for c, t in
                      (("user_id", "string"), ("likes", "long"), ("followers", "long"), ("posted_at", "timestamp"))],
                    F.col("uri").alias("image_uri"), F.col("size").alias("image_size")))
    inputs = union_all([meta.select(F.col("uri").alias("key")), orphans.select(F.col("uri").alias("key")),
                        extra_caps.select(F.col("uri").alias("key"))])
    return todo, rejects, inputs
