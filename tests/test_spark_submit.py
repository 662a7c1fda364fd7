import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import Sample
from sparkml.sample.make_sample import generate
from tests.conftest import ROOT


@pytest.mark.slow
def test_spark_submit_runs_a_job_end_to_end(tmp_path):
    """The README's way: spark-submit jobs/ingest.py --config conf/local.yaml --set ..."""
    truth = generate(Sample(out=str(tmp_path / "s"), posts=60, seed=5, size=96, workers=1))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(
        [str(bin_dir / "spark-submit"), "--master", "local[2]", "--driver-memory", "1g",
         "jobs/ingest.py", "--config", "conf/local.yaml",
         "--set", f"lake={tmp_path / 'lake'}", "--set", f"source.path={tmp_path / 's' / 'manifest.jsonl'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "lake" / "tables" / "posts" / "_SUMMARY.json").read_text())
    assert summary["input_rows"] == truth["manifest_rows"] and summary["balanced"]
    assert "ingest: input=" in done.stdout
