"""The one SparkSession factory every job uses.

Under spark-submit the session the launcher configured is reused (its command-line
settings win; the profile fills in what it did not set). Under plain `python` a local
session is built from the profile. Arrow is always on; s3a is configured when the
profile names an S3 endpoint.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from core.config import Config

DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    "spark.sql.session.timeZone": "UTC",
    # Parquet files written with legacy-compatible list/map encodings read everywhere
    # (petastorm's pyarrow 14 reader included).
    "spark.sql.parquet.writeLegacyFormat": "false",
    # pyspark's daemon with the archives on the workers' path read once, not before every task
    "spark.python.daemon.module": "core.pyspark_daemon",
}


def s3a_conf(cfg: Config) -> dict[str, str]:
    """Hadoop settings for s3a:// from the profile's `s3:` section (credentials stay in the environment)."""
    conf = {
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        # EnvironmentVariableCredentialsProvider first, then the usual chain (instance roles).
        "spark.hadoop.fs.s3a.aws.credentials.provider": (
            "com.amazonaws.auth.EnvironmentVariableCredentialsProvider,"
            "com.amazonaws.auth.DefaultAWSCredentialsProviderChain"
        ),
        # Hadoop 3.4 (Spark 4) writes these defaults with units ("60s"), which a hadoop-aws 3.3 jar
        # (what core.jars fetches for s3a outside the clusters) reads as plain numbers and
        # fails on: the same values, as numbers in the unit both versions read them in.
        "spark.hadoop.fs.s3a.threads.keepalivetime": "60",  # s
        "spark.hadoop.fs.s3a.connection.establish.timeout": "30000",  # ms
        "spark.hadoop.fs.s3a.connection.timeout": "200000",  # ms
        "spark.hadoop.fs.s3a.multipart.purge.age": "86400",  # s
    }
    if cfg.s3.endpoint:
        conf["spark.hadoop.fs.s3a.endpoint"] = cfg.s3.endpoint
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(cfg.s3.endpoint.startswith("https")).lower()
    if cfg.s3.path_style_access:
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
    if cfg.s3.region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = cfg.s3.region
    return conf


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_session(cfg: Config, app_name: str = "instalearn") -> SparkSession:
    """The active session if there is one, else one built from the profile."""
    wanted = {**DEFAULTS, **s3a_conf(cfg), **cfg.spark_conf()}
    active = SparkSession.getActiveSession()
    if active is not None:
        _apply_runtime(active, wanted)
        return active

    builder = SparkSession.builder.appName(app_name)
    if _launched_by_spark_submit():
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()  # connect to the launcher's JVM to read its settings
        given = SparkConf()  # what spark-submit set (command line, spark-defaults.conf) wins
        wanted = {k: v for k, v in wanted.items() if not given.contains(k)}
        master = given.get("spark.master", wanted.get("spark.master", ""))
    else:
        master = wanted.setdefault("spark.master", "local[*, 4]")
    for key, value in wanted.items():
        builder = builder.config(key, value)
    if master.startswith("local"):
        # Local workers must run this interpreter (the venv), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("INSTALEARN_SPARK_LOG_LEVEL", "WARN"))
    _apply_runtime(spark, wanted)
    return spark


def _apply_runtime(spark: SparkSession, conf: dict[str, str]) -> None:
    """Settings that can change on a running session: SQL confs and Hadoop (s3a) confs."""
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in conf.items():
        if key.startswith("spark.hadoop."):
            hadoop.set(key[len("spark.hadoop."):], value)
        elif key.startswith("spark.sql.") and spark.conf.isModifiable(key):
            spark.conf.set(key, value)
