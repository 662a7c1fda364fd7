"""Identical inputs give identical outputs: the data side run twice into two lakes with other
parallelism, shuffle partitions and batch sizes (one run in this process on local[2], one in a
child process on local[1]) writes the same rows in every table, topic vectors included."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from core.lake import Lake
from core.schemas import SPLITS, TABLES
from sparkml.sample.make_sample import MANIFEST
from tests.conftest import ROOT, run_job

STAGES = ("ingest", "prepare_images", "dedup", "train_lda", "infer_topics", "build_dataset")
COMMON = ["--set", "lda.num_topics=8", "--set", "lda.min_count=5", "--set", "lda.passes=3", "--set", "lda.chunksize=40",
          "--set", "dedup.search=lsh"]  # the approximate search (the exact one's reruns: tests/test_prepare_dedup.py)
OTHER = ["--set", "spark.master=local[1]", "--set", "spark.sql.shuffle.partitions=3", "--set", "prepare.batch_rows=7",
         "--set", "lda.infer_batch_rows=13", "--set", "ingest.batch_rows=5", "--set", "ingest.read_threads=1"]


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def _rows(spark, uri: str) -> Counter:
    return Counter(tuple(_frozen(v) for v in r) for r in spark.read.parquet(uri).collect())


@pytest.mark.slow
def test_two_runs_with_other_parallelism_write_identical_tables(spark, sample, tmp_path):
    root, truth = sample
    a, b = tmp_path / "a", tmp_path / "b"
    source = ["--set", f"source.path={root / MANIFEST}", "--set", "source.layout=manifest"]
    script = ("import sys; from tests.conftest import run_job\n"
              f"for stage in {STAGES!r}:\n"
              f"    assert run_job(stage, *sys.argv[1:]) == 0, stage\n")
    # the child's run (one core) goes on while this process makes its own: the two share nothing
    log = tmp_path / "child.log"
    with log.open("w") as out, subprocess.Popen([sys.executable, "-c", script, "--set", f"lake={b}", *source, *COMMON,
                                                 *OTHER], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT) as child:
        try:
            for stage in STAGES:
                assert run_job(stage, "--set", f"lake={a}", *source, *COMMON) == 0, stage
            child.wait(timeout=900)
        finally:
            child.kill()
    assert child.returncode == 0, log.read_text()[-3000:]
    la, lb = Lake(str(a)), Lake(str(b))
    compared = []
    for name in ("posts", "images", "duplicates", "bow", "topics"):
        assert _rows(spark, la.table(name)) == _rows(spark, lb.table(name)), name
        compared.append(name)
    for stage in ("ingest", "prepare_images", "train_lda", "build_dataset_cities"):
        assert _rows(spark, la.rejected(stage)) == _rows(spark, lb.rejected(stage)), stage
    for split in SPLITS:
        assert _rows(spark, f"{la.dataset('cities')}/{split}") == _rows(spark, f"{lb.dataset('cities')}/{split}")
    model = "lda.model.expElogbeta.npy"
    assert (Path(la.model("lda")[len("file://"):]) / model).read_bytes() == \
        (Path(lb.model("lda")[len("file://"):]) / model).read_bytes()
    topics = spark.read.parquet(la.table("topics"))
    assert topics.count() > 100 and set(compared) <= set(TABLES)
