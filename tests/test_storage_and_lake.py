import os

from core import storage
from core.config import load_config
from sparkml.lake import Lake, Summary, read_summary, write_summary
from sparkml.session import get_session, s3a_conf
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
