"""Likability labels (the "#me" study): a robust follower filter over users, then
likes / followers ratios labelled good (1) above the median and bad (0) at or below it.

Statistics are over users, not images (one value per user: the median of the follower
counts their valid posts report), computed by Spark with `percentile_approx` (rank error
1/followers.accuracy) or exactly. MAD = median(|x - median(x)|) of those values; a user
is kept when |x - median| <= k * MAD, on followers or ln(followers). When more than half
the users share one count the MAD is 0 and the rule would keep only that count; the mean
absolute deviation is used instead (the summary says so), and if that is 0 too every
user has the same count and all are kept.

    posts -> <lake>/tables/likability_labels (schemas.LIKABILITY) + rejected by reason
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from core.config import Config, Followers
from core.lake import Lake, Summary, begin_output, conform, read_table, write_rejected, write_table
from core.schemas import Reason


def _quantiles(df: DataFrame, col: str, probs: list[float], f: Followers) -> list[float]:
    """Quantiles of df[col]: percentile_approx (an element of the data) or exact (interpolated)."""
    arr = "array(" + ", ".join(repr(float(p)) for p in probs) + ")"
    expr = f"percentile({col}, {arr})" if f.exact else f"percentile_approx({col}, {arr}, {f.accuracy})"
    row = df.agg(F.expr(expr).alias("q")).first()
    return [float(x) for x in row["q"]] if row and row["q"] is not None else []


def robust_center(df: DataFrame, col: str, f: Followers) -> tuple[float, float, str]:
    """(median, spread, kind) of df[col]: the MAD, or the mean absolute deviation when the MAD is 0."""
    q = _quantiles(df, col, [0.5], f)
    if not q:
        return float("nan"), float("nan"), "no users"
    med = q[0]
    dev = df.select(F.abs(F.col(col) - F.lit(med)).alias("dev"))
    mad = _quantiles(dev, "dev", [0.5], f)[0]
    if mad > 0:
        return med, mad, "mad"
    return med, float(dev.agg(F.avg("dev")).first()[0] or 0.0), "mean_abs_dev (MAD was 0)"


def _invalid(f: Followers, as_of) -> Column:
    """The first reason a post cannot get a likability label, or null."""
    too_recent = F.lit(False)
    if f.min_age_days > 0:
        cutoff = F.lit(as_of) - F.expr(f"make_dt_interval(0, 0, 0, {f.min_age_days * 86400:.3f})")
        too_recent = F.col("posted_at").isNotNull() & (F.col("posted_at") > cutoff)
    return (F.when(F.col("user_id").isNull() | (F.trim("user_id") == ""), Reason.USER_MISSING.value)
            .when(F.col("followers").isNull(), Reason.FOLLOWERS_MISSING.value)
            .when(F.col("followers") < 0, Reason.FOLLOWERS_NEGATIVE.value)
            .when(F.col("followers") == 0, Reason.FOLLOWERS_ZERO.value)
            .when(F.col("likes").isNull() | (F.col("likes") < 0), Reason.LIKES_INVALID.value)
            .when(too_recent, Reason.TOO_RECENT.value))


def label_posts(spark: SparkSession, posts: DataFrame, f: Followers) -> tuple[DataFrame, DataFrame, dict]:
    """posts (post_id, user_id, likes, followers, posted_at) -> (labels, rejects, stats)."""
    as_of = f.as_of
    if f.min_age_days > 0 and as_of is None:
        as_of = posts.agg(F.max("posted_at")).first()[0]
    checked = posts.withColumn("reason", _invalid(f, as_of)).persist()
    bad = checked.where(F.col("reason").isNotNull()).select(
        "post_id", "reason", F.format_string("user_id=%s likes=%s followers=%s posted_at=%s", F.col("user_id"),
                                             F.col("likes"), F.col("followers"), F.col("posted_at").cast("string")).alias("detail"))
    valid = checked.where(F.col("reason").isNull()).drop("reason")

    per_user = valid.groupBy("user_id").agg(
        F.expr("percentile(followers, 0.5)" if f.exact else f"percentile_approx(followers, 0.5, {f.accuracy})")
        .cast("double").alias("user_followers"))
    value = F.log("user_followers") if f.log_scale else F.col("user_followers")
    users = per_user.withColumn("x", value).persist()
    med, spread, kind = robust_center(users, "x", f)
    users = users.withColumn("kept", F.abs(F.col("x") - F.lit(med)) <= F.lit(f.k * spread))
    scored = valid.join(users.select("user_id", "user_followers", "kept"), "user_id")
    outliers = scored.where(~F.col("kept")).select(
        "post_id", F.lit(Reason.FOLLOWER_OUTLIER.value).alias("reason"),
        F.format_string(f"user %s has %.0f followers; kept: |{'ln(followers)' if f.log_scale else 'followers'}"
                        f" - {med:.6g}| <= {f.k:g} * {spread:.6g} ({kind})",
                        F.col("user_id"), F.col("user_followers")).alias("detail"))
    kept = scored.where(F.col("kept")).withColumn("ratio", F.col("likes") / F.col("followers")).persist()

    if f.label_by == "buckets":
        edges = _quantiles(kept, "followers", [i / f.buckets for i in range(1, f.buckets)], f)
        bucket = sum((F.col("followers") > F.lit(e)).cast("int") for e in edges) if edges else F.lit(0)
    else:
        edges, bucket = [], F.lit(0)
    kept = kept.withColumn("bucket", bucket.cast("int"))
    med_expr = "percentile(ratio, 0.5)" if f.exact else f"percentile_approx(ratio, 0.5, {f.accuracy})"
    medians = {int(r["bucket"]): float(r["m"]) for r in kept.groupBy("bucket").agg(F.expr(med_expr).alias("m")).collect()}
    table = spark.createDataFrame(sorted(medians.items()), "bucket int, median_ratio double")
    labels = (kept.join(F.broadcast(table), "bucket")
              .withColumn("label", (F.col("ratio") > F.col("median_ratio")).cast("int")))
    labels = conform(labels, "likability_labels")
    stats = {"users": users.count(), "users_kept": users.where("kept").count(), "median": med, "spread": spread,
             "spread_kind": kind, "k": f.k, "log_scale": f.log_scale, "label_by": f.label_by,
             "bucket_edges": edges, "median_ratio": {str(b): m for b, m in sorted(medians.items())},
             "as_of": str(as_of) if as_of is not None else None, "exact": f.exact,
             "accuracy": None if f.exact else f.accuracy}
    return labels, bad.unionByName(outliers), stats


def filter_followers(spark: SparkSession, cfg: Config) -> Summary:
    """posts -> <lake>/tables/likability_labels (+ rejects by reason)."""
    lake = Lake(cfg.lake)
    out = lake.table("likability_labels")
    begin_output(spark, out)
    posts = read_table(spark, lake, "posts").select(
        "post_id", "user_id", "likes", "followers", "posted_at")
    labels, rejects, stats = label_posts(spark, posts, cfg.followers)
    write_table(labels, lake, "likability_labels")
    rejected = write_rejected(spark, lake, "filter_followers", rejects)
    written = spark.read.parquet(out)
    by_label = {str(r["label"]): int(r["count"]) for r in written.groupBy("label").count().collect()}
    return Summary(stage="filter_followers", input_rows=posts.count(), output_rows=sum(by_label.values()),
                   rejected=rejected, output=out, extra={**stats, "labels": by_label})
