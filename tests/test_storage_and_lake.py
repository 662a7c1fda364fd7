import os

import pytest

from core import storage
from core import lake as lk
from core.config import load_config
from core.lake import IncompleteInput, Lake, Summary, read_summary, write_summary
from core.session import get_session, s3a_conf
from tests.conftest import ROOT


def test_uris():
    assert storage.qualify("/a/b/../c") == "file:///a/c"
    assert storage.qualify("file:/a/b") == "file:///a/b"
    assert storage.qualify("rel/x") == "file://" + os.path.abspath("rel/x")
    assert storage.qualify("s3a://bk/k") == "s3a://bk/k"
    assert storage.resolve("s3a://bk/dir", "img/a.jpg") == "s3a://bk/dir/img/a.jpg"
    assert storage.resolve("s3a://bk/dir", "../img/a.jpg") == "s3a://bk/img/a.jpg"
    assert storage.resolve("s3a://bk/dir", "/abs/a.jpg") == "s3a://bk/abs/a.jpg"
    assert storage.resolve("file:///m", "gs://b/x.jpg") == "gs://b/x.jpg"
    assert storage.resolve("/m", "/x/y.jpg") == "file:///x/y.jpg"
    assert storage.parent("s3a://bk/dir/m.jsonl") == "s3a://bk/dir"
    assert storage.arrow_path("s3a://bk/dir/x") == ("s3a", "bk/dir/x")


def test_executor_s3_attempts_come_from_aws_max_attempts(monkeypatch):
    """The executors' pyarrow S3 client tries a request 6 times unless AWS_MAX_ATTEMPTS says
    otherwise; a bad value is one ConfigError line on the driver before anything runs."""
    from core.config import ConfigError

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage.s3_attempts() == 6
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.s3_attempts() == 2
    two = storage.arrow_filesystem("s3a", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # a client per number of attempts, not the first one cached
    assert storage.arrow_filesystem("s3a", "http://127.0.0.1:1") is not two
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.arrow_filesystem("s3a", "http://127.0.0.1:1") is two
    for bad in ("0", "two", "-1", "2.5"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", bad)
        with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS"):
            storage.s3_attempts()
        with pytest.raises(ConfigError, match="AWS_MAX_ATTEMPTS"):
            storage.check_reachable(["s3a://bucket/lake"], "http://127.0.0.1:1", None)


def test_read_many_and_listing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"abc")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    uris = [f"file://{tmp_path}/a/x.jpg", f"file://{tmp_path}/a/missing.jpg", None]
    assert storage.read_many(uris, threads=4) == [b"abc", None, None]
    assert storage.sizes(uris[:2], threads=2) == [3, None]
    assert storage.list_files(str(tmp_path)) == [(f"file://{tmp_path}/a/empty.jpg", 0), (f"file://{tmp_path}/a/x.jpg", 3)]
    assert storage.list_files(str(tmp_path / "nothing")) == []


def test_summary_balance_and_roundtrip(spark, tmp_path):
    s = Summary(stage="x", input_rows=10, output_rows=6, rejected={"a": 3}, duplicates={"exact": 1},
                output=str(tmp_path), extra={"k": 1})
    assert s.balanced
    write_summary(spark, s)
    back = read_summary(spark, str(tmp_path))
    assert back["k"] == 1 and back["balanced"] is True and back["duplicates"] == {"exact": 1}
    assert not Summary(stage="x", input_rows=10, output_rows=6, rejected={"a": 3}).balanced
    lake = Lake("s3a://b/run/")
    assert lake.table("posts") == "s3a://b/run/tables/posts"
    assert lake.rejected("ingest") == "s3a://b/run/tables/rejected/stage=ingest"


def test_an_input_opens_only_complete_balanced_and_fresh_and_outputs_close_with_the_run_that_read_it(spark, tmp_path):
    up, down, other = (str(tmp_path / n) for n in ("up", "down", "other"))
    first = lk.start_run()
    lk.close_output(spark, Summary(stage="a", input_rows=2, output_rows=2, output=up))
    assert read_summary(spark, up)["run_id"] == first and read_summary(spark, up)["inputs"] == {}
    second = lk.start_run()
    assert second != first
    assert lk.open_input(spark, up, "run a first")["run_id"] == first
    lk.close_output(spark, Summary(stage="b", input_rows=2, output_rows=2, output=down))
    lk.close_output(spark, {"stage": "b", "output": other, "k": 3})  # a stage's other output: a report, a model
    for out in (down, other):
        assert read_summary(spark, out)["run_id"] == second and read_summary(spark, out)["inputs"] == {"../up": first}
    assert read_summary(spark, other)["k"] == 3
    assert lk.open_input(spark, down, "run b first")["output_rows"] == 2
    lk.start_run()  # `up` made again: `down` is stale, but a model-like reader may still take it
    lk.close_output(spark, Summary(stage="a", input_rows=1, output_rows=1, output=up))
    with pytest.raises(IncompleteInput, match=r"down is stale: it was made from .*up, which has been rewritten.*; run b again"):
        lk.open_input(spark, down, "run b first")
    assert lk.open_input(spark, down, "run b first", fresh=False)["run_id"] == second
    write_summary(spark, Summary(stage="c", input_rows=3, output_rows=1, output=str(tmp_path / "lost")))
    with pytest.raises(IncompleteInput, match=r"lost is unbalanced .*: run c first"):
        lk.open_input(spark, str(tmp_path / "lost"), "run c first")
    with pytest.raises(IncompleteInput, match=r"nothing is missing or incomplete: run d first"):
        lk.open_input(spark, str(tmp_path / "nothing"), "run d first")


def test_session_is_shared_and_arrow_is_on(spark, moto_endpoint):
    cfg = load_config(ROOT / "conf" / "local.yaml", ["spark.sql.shuffle.partitions=3"])
    again = get_session(cfg)
    assert again is spark
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.conf.get("spark.sql.shuffle.partitions") == "3"
    conf = s3a_conf(load_config(ROOT / "conf" / "local.yaml", [f"s3.endpoint={moto_endpoint}", "s3.path_style_access=true"]))
    assert conf["spark.hadoop.fs.s3a.endpoint"] == moto_endpoint
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"


def test_python_workers_keep_their_archives_read_and_import_the_installed_pyspark(spark):
    """core.pyspark_daemon: a task's importlib.invalidate_caches() (pyspark's worker calls it before
    each task) leaves every archive importer's directory as read (Python up to 3.12 reads the
    archive again); pyspark comes from the package the driver imports, not from the zip inside it."""
    import pyspark

    def probe(_):
        import importlib
        import sys
        import zipimport

        import pyspark as worker_pyspark

        archives = [f.archive for f in sys.path_importer_cache.values() if isinstance(f, zipimport.zipimporter)]
        before = [id(zipimport._zip_directory_cache.get(a)) for a in archives]
        importlib.invalidate_caches()
        after = [id(zipimport._zip_directory_cache.get(a)) for a in archives]
        yield worker_pyspark.__file__, archives, before == after

    (file, archives, kept), = spark.sparkContext.parallelize([0], 1).mapPartitions(probe).collect()
    assert file == pyspark.__file__ and ".zip" not in file
    assert any(a.endswith("pyspark.zip") for a in archives) and kept, archives
    assert spark.sparkContext.getConf().get("spark.python.daemon.module") == "core.pyspark_daemon"
