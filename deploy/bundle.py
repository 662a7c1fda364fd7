"""Build what a cluster needs: a venv-pack archive of the pinned environment (the project wheel
installed into a fresh venv with its stack's constraints), the wheel itself, and a bundle.json saying
what is inside; optionally upload them with the jobs and profiles to s3:// or gs://.

Flavors:
- gpu:  every dependency from the registry (torch's CUDA 13 wheels: NVIDIA driver >= 580);
- cpu:  torch and torchvision from the PyTorch CPU index (--torch-index), no CUDA libraries;
- data: no torch, torchvision or tensorboard: the data stages only (ingest .. build_dataset,
        faces, topics, SVMs, report), the smallest.
pyspark is not in the archive (not even installed while building it: petastorm's requirement of it
is skipped): the cluster's own Spark is on the executors' PYTHONPATH.

The venv's python is a link to the cluster's interpreter (--python-prefix, where bin/python3.X
lives there: /usr on EMR with python3.X installed by deploy/emr/bootstrap.sh,
/opt/conda/default on Dataproc images), so build it with the same Python minor version
(--python), on the same OS family (x86_64 manylinux wheels). --stack picks the pinned set
(docs/platforms.md): spark35 (constraints-spark35.txt) for EMR 7 / Dataproc 2.x, spark4
(constraints.txt) for EMR 8 / Dataproc 3.0+; by default spark35 for Python 3.11, spark4 above.

    python -m deploy.bundle --flavor cpu --python python3.12 --python-prefix /usr
    python -m deploy.bundle --flavor gpu --upload s3://my-bucket/instalearn/deploy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAVORS = ("gpu", "cpu", "data")
TORCH = ("torch", "torchvision")
NO_TORCH = ("torch", "torchvision", "tensorboard")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REMOVED = ("pyspark", "py4j")  # the cluster's Spark provides them
STACKS = {"spark4": "constraints.txt", "spark35": "constraints-spark35.txt"}


def _name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep, 1)[0]
    return req.strip().lower()


def requirements(flavor: str) -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    drop = set(REMOVED) | (set(NO_TORCH) if flavor == "data" else set(TORCH) if flavor == "cpu" else set())
    return [d for d in deps if _name(d) not in drop]


def petastorm_requirements() -> list[str]:
    """What the patched petastorm wheel (.cache/wheels, built by `make setup`) requires, less its
    extras and what the cluster's Spark provides."""
    import zipfile

    found = sorted((ROOT / ".cache" / "wheels").glob("petastorm-*.whl"))
    if not found:
        raise SystemExit("bundle: error: no petastorm wheel in .cache/wheels: run `make setup` first")
    with zipfile.ZipFile(found[-1]) as whl:
        meta = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and _name(r) not in REMOVED]


def _run(cmd: list, **kw) -> None:
    print("bundle: $", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def build(flavor: str, out: Path, python: str, python_prefix: str | None, torch_index: str, compress: int,
          stack: str | None = None) -> dict:
    if flavor not in FLAVORS:
        raise SystemExit(f"bundle: error: --flavor {flavor}: one of {', '.join(FLAVORS)}")
    import venv_pack

    t0 = time.perf_counter()
    work = out / f"build-{flavor}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # the project wheel (no dependencies), built with this interpreter's setuptools
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT])
    wheel = sorted(out.glob(f"instalearn-{version}-*.whl"))[-1]
    venv = work / "venv"
    _run([python, "-m", "venv", venv])
    pyver = subprocess.run([venv / "bin" / "python", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                           capture_output=True, text=True, check=True).stdout.strip()
    stack = stack or ("spark35" if pyver == "3.11" else "spark4")
    pinned = ROOT / STACKS[stack]
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the patched petastorm (deploy/petastorm/, built by `make setup`) is found only in the wheel cache
    constraints = ["-c", pinned, "--find-links", ROOT / ".cache" / "wheels"]
    if flavor == "cpu":
        pins = {_name(line): line.strip() for line in pinned.read_text().splitlines()
                if _name(line) in TORCH}
        _run([*pip, "--index-url", torch_index, *pins.values()])
    # petastorm's metadata asks for pyspark, which the cluster provides: petastorm goes in without
    # its dependencies and its other requirements by name, so pip never unpacks Spark (470 MB)
    reqs = requirements(flavor)
    petastorm = [r for r in reqs if _name(r) == "petastorm"]
    _run([*pip, *constraints, *[r for r in reqs if r not in petastorm], *petastorm_requirements()])
    _run([*pip, *constraints, "--no-deps", *petastorm])
    _run([*pip, "--no-deps", wheel])
    listed = subprocess.run([venv / "bin" / "python", "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installed = {_name(line) for line in listed}
    brought = [n for n in REMOVED if n in installed]
    if brought:  # another dependency asked for them: they would shadow the cluster's
        _run([venv / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", *brought])
    archive = out / f"instalearn-{version}-{flavor}-py{pyver.replace('.', '')}.tar.gz"
    archive.unlink(missing_ok=True)
    t1 = time.perf_counter()
    venv_pack.pack(prefix=str(venv), output=str(archive), python_prefix=python_prefix, compress_level=compress)
    info = {"archive": archive.name, "wheel": wheel.name, "flavor": flavor, "stack": stack, "python": pyver,
            "python_prefix": python_prefix or "(the build machine's)", "bytes": archive.stat().st_size,
            "unpacked_bytes": sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()),
            "install_seconds": round(t1 - t0, 1), "pack_seconds": round(time.perf_counter() - t1, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / f"{archive.name}.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(work)
    print(f"bundle: {archive} ({info['bytes'] / 2**20:.0f} MiB packed, {info['unpacked_bytes'] / 2**20:.0f} MiB "
          f"unpacked, Python {pyver}; install {info['install_seconds']}s, pack {info['pack_seconds']}s)")
    return info


def upload(files: list[tuple[Path, str]], endpoint: str | None = None) -> None:
    """Copy (local, remote URI) pairs to s3:// (boto3, multipart) or gs:// (pyarrow's GCS client);
    credentials from the environment, instance profile or workload identity."""
    for local, remote in files:
        scheme, _, rest = remote.partition("://")
        bucket, _, key = rest.partition("/")
        if scheme in ("s3", "s3a"):
            import boto3

            boto3.client("s3", endpoint_url=endpoint).upload_file(str(local), bucket, key)
        elif scheme == "gs":
            import pyarrow.fs as pafs

            pafs.copy_files(str(local), rest, destination_filesystem=pafs.GcsFileSystem())
        else:
            raise SystemExit(f"bundle: error: {remote}: upload to s3:// or gs://")
        print(f"bundle: uploaded {local.name} -> {remote}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", choices=FLAVORS, default="gpu")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the venv (the cluster's minor version)")
    ap.add_argument("--python-prefix", help="prefix of that Python on the cluster (/usr on EMR, /opt/conda/default "
                                            "on Dataproc); default: this machine's")
    ap.add_argument("--stack", choices=sorted(STACKS), help="the pinned set (docs/platforms.md); default: spark35 "
                                                            "for Python 3.11, spark4 above")
    ap.add_argument("--torch-index", default=TORCH_CPU_INDEX, help="index of the CPU torch wheels (--flavor cpu)")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "bundle")
    ap.add_argument("--compress", type=int, default=4, help="gzip level")
    ap.add_argument("--upload", metavar="URI", help="s3://bucket/prefix or gs://bucket/prefix: upload archive and wheel")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = build(args.flavor, args.out, args.python, args.python_prefix, args.torch_index, args.compress, args.stack)
    if args.upload:
        base = args.upload.rstrip("/")
        upload([(args.out / n, f"{base}/{n}") for n in (info["archive"], info["wheel"], f"{info['archive']}.json")],
               os.environ.get("AWS_ENDPOINT_URL_S3"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
