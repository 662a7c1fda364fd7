"""S3 round trip against a real HTTP endpoint (moto server on 127.0.0.1): Spark via s3a://,
the driver via boto3, executors via pyarrow.fs."""

import json

import boto3
import pytest

from sparkml.sample import MANIFEST
from tests.conftest import planted, run_job

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def bucket(sample, moto_endpoint):
    root, truth = sample
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="posts")
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "posts", f"sample/{path.relative_to(root)}")
    return s3


@pytest.mark.parametrize("layout, source", [("instacities", "s3a://posts/sample"),
                                            ("manifest", f"s3a://posts/sample/{MANIFEST}")])
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
