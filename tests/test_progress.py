"""Progress lines: a stage that counts its rows reports rows done of total, rate and ETA while
it runs; under CI the lines are off unless asked for."""

import logging
import time

from core import progress


def test_a_running_stage_logs_rows_done_of_total(spark, caplog):
    def slow(b):
        time.sleep(0.3)
        return b

    df = spark.range(0, 400, numPartitions=8).selectExpr("id", "cast(id as string) as s")
    with caplog.at_level(logging.INFO, logger="instalearn"):
        with progress.Progress(spark, "demo", 0.5):
            acc = progress.counter(spark, 400)
            got = df.mapInArrow(lambda bs: progress.counted(bs, slow, acc), df.schema).count()
    assert got == 400 and acc.value == 400
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo: ")]
    assert lines, "no progress line while the job ran"
    assert any("/400 rows (" in line and "rows/s" in line for line in lines), lines


def test_progress_is_off_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert progress.interval(30) == 0
    monkeypatch.setenv("CI", "")
    assert progress.interval(30) == 30
    assert progress.duration(3725) == "1h02m" and progress.duration(65) == "1m05s"


def test_a_stage_without_a_row_count_reports_its_spark_jobs(spark):
    p = progress.Progress(spark, "svm", 0)
    spark.range(10).count()
    line = p.line()
    assert line.startswith("svm: ") and "Spark jobs done in" in line
