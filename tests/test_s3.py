"""S3 round trip against a real HTTP endpoint (moto server on 127.0.0.1): Spark via s3a://,
the driver via boto3, executors via pyarrow.fs."""

import json

import boto3
import pytest

from sparkml.sample.make_sample import MANIFEST
from tests.conftest import planted, run_job

pytestmark = pytest.mark.s3


def _upload_sample(s3, root, bucket: str) -> None:
    """A new bucket holding the generated sample under sample/."""
    s3.create_bucket(Bucket=bucket)
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"sample/{path.relative_to(root)}")


@pytest.fixture(scope="module")
def bucket(sample, moto_endpoint):
    root, truth = sample
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    _upload_sample(s3, root, "posts")
    return s3


@pytest.mark.parametrize("layout, source", [("instacities", "s3a://posts/sample"),
                                            ("manifest", f"s3a://posts/sample/{MANIFEST}")])
@pytest.mark.slow
@pytest.mark.lane35
def test_ingest_from_s3a_into_an_s3_lake(spark, sample, bucket, s3_sets, layout, source):
    root, truth = sample
    lake = f"s3a://posts/lake-{layout}"
    assert run_job("ingest", "--set", f"lake={lake}", "--set", f"source.path={source}",
                   "--set", f"source.layout={layout}", *s3_sets) == 0
    summary = json.loads(bucket.get_object(Bucket="posts", Key=f"lake-{layout}/tables/posts/_SUMMARY.json")["Body"].read())
    assert summary["balanced"]
    if layout == "instacities":
        assert summary["input_rows"] == truth["image_files"] + len(planted(truth, "image_missing"))
        assert summary["rejected"] == {"empty_image": 2, "image_missing": 2, "duplicate_post": 1}
    else:
        assert summary["input_rows"] == truth["manifest_rows"]
        assert summary["rejected"] == {"bad_manifest_row": 1, "duplicate_post": 1, "empty_image": 2, "image_missing": 2}
    posts = spark.read.parquet(f"{lake}/tables/posts")
    assert posts.count() == summary["output_rows"]
    row = posts.where("caption_status = 'ok'").select("image_uri", "image_bytes").first()
    assert row.image_uri.startswith("s3a://posts/sample/")
    key = row.image_uri[len("s3a://posts/"):]
    assert bytes(row.image_bytes) == bucket.get_object(Bucket="posts", Key=key)["Body"].read()
    rejected = spark.read.parquet(f"{lake}/tables/rejected/stage=ingest")
    assert rejected.count() == sum(summary["rejected"].values())


def test_an_unreachable_endpoint_fails_fast_with_one_line(spark, capsys):
    import time

    t0 = time.perf_counter()
    capsys.readouterr()
    assert run_job("ingest", "--set", "lake=s3a://nowhere/lake", "--set", "source.path=s3a://nowhere/m.jsonl",
                   "--set", "source.layout=manifest", "--set", "s3.endpoint=http://127.0.0.1:1") == 2
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be reached" in err[0] and "127.0.0.1:1" in err[0], err


# Bounded s3a retries for the fault tests (Hadoop's defaults retry for minutes), and no cached
# s3a filesystems, so each run meets the endpoint it was given.
S3A_RETRIES = {"fs.s3a.impl.disable.cache": "true", "fs.s3a.attempts.maximum": "3", "fs.s3a.retry.limit": "4",
               "fs.s3a.retry.interval": "50ms", "fs.s3a.retry.throttle.limit": "4",
               "fs.s3a.retry.throttle.interval": "50ms", "fs.s3a.connection.establish.timeout": "5000",
               "fs.s3a.connection.timeout": "20000"}


@pytest.fixture
def s3a_bounded(spark):
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    before = {k: hadoop.get(k) for k in [*S3A_RETRIES, "fs.s3a.endpoint"]}
    yield [x for k, v in S3A_RETRIES.items() for x in ("--set", f"spark.hadoop.{k}={v}")]
    for k, v in before.items():
        hadoop.unset(k) if v is None else hadoop.set(k, v)


def _posts(spark, lake: str) -> list[tuple]:
    import hashlib

    rows = spark.read.parquet(f"{lake}/tables/posts").select(
        "post_id", "image_uri", "caption", "likes", "followers", "image_bytes").collect()
    return sorted((r.post_id, r.image_uri, r.caption, r.likes, r.followers,
                   hashlib.sha256(bytes(r.image_bytes)).hexdigest()) for r in rows)


def _rejected(spark, lake: str) -> list[tuple]:
    return sorted(tuple(r) for r in spark.read.parquet(f"{lake}/tables/rejected/stage=ingest")
                  .select("post_id", "reason").collect())


@pytest.mark.slow
def test_ingest_through_an_s3_endpoint_that_fails_part_of_its_requests(spark, sample, moto_endpoint, s3a_bounded,
                                                                      tmp_path):
    """503 SlowDown, 500, connection resets and slow answers on about one request in five, for
    the manifest read, the image stats and reads (pyarrow.fs), the bucket check (boto3) and the
    Parquet writes and summaries through s3a: the run completes with the output of a clean run."""
    from tests.s3_proxy import FAULTS, FaultProxy

    root, truth = sample
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    _upload_sample(s3, root, "flaky")
    source = ["--set", f"source.path=s3a://flaky/sample/{MANIFEST}", "--set", "source.layout=manifest",
              "--set", "s3.path_style_access=true", *s3a_bounded]
    clean = str(tmp_path / "clean")
    assert run_job("ingest", "--set", f"lake={clean}", "--set", f"s3.endpoint={moto_endpoint}", *source) == 0

    with FaultProxy(moto_endpoint, every=5) as proxy:
        assert run_job("ingest", "--set", "lake=s3a://flaky/lake", "--set", f"s3.endpoint={proxy.url}", *source) == 0
    assert set(proxy.injected) == set(FAULTS) and sum(proxy.injected.values()) >= 40, proxy.injected

    summary = json.loads(s3.get_object(Bucket="flaky", Key="lake/tables/posts/_SUMMARY.json")["Body"].read())
    reference = json.loads((tmp_path / "clean" / "tables" / "posts" / "_SUMMARY.json").read_text())
    assert summary["balanced"] and summary["input_rows"] == truth["manifest_rows"]
    assert {k: summary[k] for k in ("input_rows", "output_rows", "rejected")} == \
           {k: reference[k] for k in ("input_rows", "output_rows", "rejected")}
    spark.sparkContext._jsc.hadoopConfiguration().set("fs.s3a.endpoint", moto_endpoint)  # read back from moto
    assert _posts(spark, "s3a://flaky/lake") == _posts(spark, clean)
    assert _rejected(spark, "s3a://flaky/lake") == _rejected(spark, clean)


@pytest.mark.slow
def test_an_s3_endpoint_that_keeps_failing_fails_the_run_leaving_nothing_complete(spark, sample, moto_endpoint,
                                                                                  s3a_bounded):
    """The same faults on the images' metadata requests, never recovering: the run fails within a
    bounded time and writes no _SUMMARY.json, so no later stage takes a part-written table for a
    finished one. A store that fails is never a record's reject (it made good posts
    bad_manifest_row rejects before). The executors' pyarrow client takes AWS_MAX_ATTEMPTS=2 (its
    default 6 tries with the SDK's backoff wait ~25 s per task attempt, four of them)."""
    import time

    from tests.s3_proxy import FaultProxy

    root, _ = sample
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    _upload_sample(s3, root, "broken")
    # the workers' environment: Spark starts the Python workers of UDFs made now with it
    spark.sparkContext.environment["AWS_MAX_ATTEMPTS"] = "2"
    with FaultProxy(moto_endpoint, every=5, attempts=10**9, faults=("503", "500", "reset"),
                    only="HEAD /broken/sample/img_resized_1M/") as proxy:
        t0 = time.perf_counter()
        try:  # under spark-submit an exception is exit 1 with its trace
            rc, why = run_job("ingest", "--set", "lake=s3a://broken/lake", "--set", f"s3.endpoint={proxy.url}",
                              "--set", f"source.path=s3a://broken/sample/{MANIFEST}", "--set", "source.layout=manifest",
                              "--set", "s3.path_style_access=true", *s3a_bounded), ""
        except Exception as e:  # noqa: BLE001
            rc, why = 1, str(e)
        finally:
            del spark.sparkContext.environment["AWS_MAX_ATTEMPTS"]
        took = time.perf_counter() - t0
    assert rc != 0 and sum(proxy.injected.values()) > 0
    assert rc in (1, 2), why
    assert took < 120, took  # 4 task attempts x 2 tries per request
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="broken", Prefix="lake/").get("Contents", [])]
    assert not [k for k in keys if k.endswith("_SUMMARY.json")], keys


def test_two_runs_on_one_s3_lake_one_refuses_and_a_dead_runs_lock_is_taken_over(spark, bucket, s3_sets, capsys):
    """S3 has no flock: the lock is an object created only if absent (If-None-Match), renewed
    while the run lives. A live holder makes the second run exit 2 with one line, before it
    writes anything; a lock nobody renewed for three leases (a killed run's) is taken over,
    and the run removes its own lock at the end."""
    import time

    from core.lake import LEASE_SECONDS

    key = "lake-locked/tables/.posts.lock"
    args = ["--set", "lake=s3a://posts/lake-locked", "--set", f"source.path=s3a://posts/sample/{MANIFEST}",
            "--set", "source.layout=manifest", *s3_sets]
    bucket.put_object(Bucket="posts", Key=key, Body=json.dumps({"holder": "pid 4242 on other-host",
                                                                  "renewed": time.time()}).encode())
    capsys.readouterr()
    assert run_job("ingest", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another run right now" in err[0] and "pid 4242 on other-host" in err[0]
    assert "Contents" not in bucket.list_objects_v2(Bucket="posts", Prefix="lake-locked/tables/posts/")

    bucket.put_object(Bucket="posts", Key=key, Body=json.dumps({"holder": "pid 4242 on other-host",
                                                                  "renewed": time.time() - 3 * LEASE_SECONDS - 1}).encode())
    assert run_job("ingest", *args) == 0
    summary = json.loads(bucket.get_object(Bucket="posts", Key="lake-locked/tables/posts/_SUMMARY.json")["Body"].read())
    assert summary["balanced"]
    assert "Contents" not in bucket.list_objects_v2(Bucket="posts", Prefix=key)  # released
