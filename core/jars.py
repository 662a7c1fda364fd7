"""Fetch the hadoop-aws and AWS SDK bundle jars that s3a:// needs outside EMR.

Maven Central is not always reachable; the `sagemaker-pyspark` source distribution on
PyPI carries `hadoop-aws-3.3.1.jar` and `aws-java-sdk-bundle-1.11.901.jar`, which work
with Spark 3.5's Hadoop 3.3.4 client. Usage: `python -m core.jars .cache/jars`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sagemaker-pyspark==1.4.5"
JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")


def jar_paths(directory: str | Path) -> list[Path]:
    """The jar files s3a needs, as they lie in `directory`."""
    return [Path(directory) / name for name in JARS]


def fetch(directory: str | Path) -> list[Path]:
    """Download the sdist once and extract the two jars into `directory` (idempotent)."""
    target = Path(directory)
    wanted = jar_paths(target)
    if all(p.exists() for p in wanted):
        return wanted
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
             "--no-binary", ":all:", SDIST, "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("sagemaker_pyspark-*.tar.gz")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in JARS:
                    data = tar.extractfile(member).read()
                    part = target / (name + ".part")
                    part.write_bytes(data)
                    part.rename(target / name)
    missing = [str(p) for p in wanted if not p.exists()]
    if missing:
        raise RuntimeError(f"{SDIST} did not contain {missing}")
    return wanted


if __name__ == "__main__":
    for path in fetch(sys.argv[1] if len(sys.argv) > 1 else ".cache/jars"):
        print(path)
