"""Run the pipeline on Google Dataproc: print (and with --execute run, in order, stopping at the
first failure) the gcloud commands that upload the packed environment, jobs and profile to
gs://, create the cluster, and submit the cluster stages of sparkml.pipeline as PySpark jobs.
--serverless submits them as Dataproc Serverless batches instead (no cluster).

    python deploy/dataproc/submit.py --bucket my-bucket                 # print the commands
    python deploy/dataproc/submit.py --bucket my-bucket --execute
    python deploy/dataproc/submit.py --bucket my-bucket --cluster existing --stages ingest --execute
    python deploy/dataproc/submit.py --bucket my-bucket --serverless

Settings: deploy/dataproc/cluster.yaml (--settings, --set key=value); job settings:
conf/dataproc.yaml (--config), whose YOUR-BUCKET is replaced by the bucket. Credentials are
gcloud's (a login or the service account): a settings file or option holding keys is refused.
Exit codes: 0 done, 1 a command failed (its stage named), 2 bad options or settings.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from deploy.common import (ENV, Stack, ROOT, DeployError, add_arguments, check_bucket, check_bundle, check_flavor,  # noqa: E402
                           check_profile,
                           cluster_stages, find_bundle, load_settings, refuse_secrets, render_profile, stage_args,
                           redact, stage_conf, uploads, version, weight_uploads)

DISCOVERY = "/usr/lib/spark/scripts/gpu/getGpusResources.sh"  # installed by Dataproc's GPU init action


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Machines(_Strict):
    type: str = Field(min_length=1)
    count: int = Field(1, ge=0)


class _Accelerator(_Strict):
    type: str | None = None
    count: int = Field(0, ge=0)
    tasks_per_gpu: int = Field(4, ge=1)
    driver_version: str = Field("580.95.05", pattern=r"^\d+(\.\d+)*$")


class _Serverless(_Strict):
    version: str = Field(pattern=r"^\d+\.\d+$")
    python: str = Field(pattern=r"^3\.\d+$")
    stack: Stack = "spark4"


class Settings(_Strict):
    """deploy/dataproc/cluster.yaml: every key typed, unknown keys refused (--set included)."""

    name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")
    project: str | None = None
    region: str = Field(pattern=r"^[a-z]+-[a-z]+\d+$")
    zone: str | None = None
    bucket: str
    prefix: str = Field(pattern=r"^[A-Za-z0-9._/-]+$")
    image_version: str = Field(min_length=1)
    python: str = Field("3.12", pattern=r"^3\.\d+$")
    stack: Stack = "spark4"
    bundle: Literal["gpu", "cpu", "data"] = "cpu"
    master: _Machines
    workers: _Machines
    accelerator: _Accelerator = Field(default_factory=_Accelerator)
    executors: int = Field(4, ge=1)
    max_idle: str = Field("1h", pattern=r"^\d+[smhd]$")
    serverless: _Serverless


def gpu_settings(s: dict) -> dict | None:
    a = s.get("accelerator") or {}
    if not a.get("type") or not int(a.get("count") or 0):
        return None
    return {"per_node": int(a["count"]), "nodes": int(s["workers"]["count"]),
            "tasks_per_gpu": int(a.get("tasks_per_gpu", 4)), "discovery": DISCOVERY}


def _scope(s: dict) -> list[str]:
    return [f"--region={s['region']}"] + ([f"--project={s['project']}"] if s.get("project") else [])


def create_cluster(s: dict, base: str, gpu: dict | None) -> list[str]:
    cmd = ["gcloud", "dataproc", "clusters", "create", s["name"], *_scope(s),
           f"--image-version={s['image_version']}",
           f"--master-machine-type={s['master']['type']}",
           f"--worker-machine-type={s['workers']['type']}", f"--num-workers={s['workers']['count']}",
           f"--max-idle={s['max_idle']}",
           "--properties=spark:spark.task.maxFailures=4"]
    if s.get("zone"):
        cmd.append(f"--zone={s['zone']}")
    actions, metadata = [], [f"instalearn-python={s['python']}"]  # init.sh checks that Python
    if gpu:
        a = s["accelerator"]
        cmd.append(f"--worker-accelerator=type={a['type']},count={a['count']}")
        # NVIDIA's driver (>= 580 for CUDA 13) and YARN's GPU scheduling, by Dataproc's own action
        actions.append(f"gs://goog-dataproc-initialization-actions-{s['region']}/gpu/install_gpu_driver.sh")
        metadata += ["gpu-driver-provider=NVIDIA", f"gpu-driver-version={a['driver_version']}"]
    cmd.append(f"--metadata={','.join(metadata)}")
    actions.append(f"{base}/deploy/init.sh")
    cmd.append(f"--initialization-actions={','.join(actions)}")
    return cmd


def _properties(conf: dict[str, str]) -> str:
    # '^#^' makes '#' the list separator, so values may hold commas
    return "--properties=^#^" + "#".join(f"{k}={v}" for k, v in conf.items())


def job_command(stage, s: dict, base: str, archive: str, profile: str, gpu: dict | None, serverless: bool) -> list[str]:
    executors = int(s.get("executors", 4))
    files = [f"{base}/conf/{profile}"] + [f"{base}/{f}" for f in stage.files]
    conf = stage_conf(stage, None if serverless else gpu, executors)
    if serverless:
        head = ["gcloud", "dataproc", "batches", "submit", "pyspark", f"{base}/{stage.path}", *_scope(s),
                f"--version={s['serverless']['version']}", f"--batch=instalearn-{stage.name.replace('_', '-')}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}"]
    else:
        # cluster deploy mode: the driver runs in a YARN container, beside the unpacked archive and --files
        conf = {"spark.submit.deployMode": "cluster", **conf}
        head = ["gcloud", "dataproc", "jobs", "submit", "pyspark", f"{base}/{stage.path}", f"--cluster={s['name']}",
                *_scope(s)]
    return [*head, f"--archives={base}/{archive}#{ENV}", f"--files={','.join(files)}", _properties(conf),
            "--", *stage_args(stage, profile, gpu if not serverless else None, executors)]


def commands(s: dict, args, pipeline, bundle: Path, profile: Path) -> list[tuple[str, list[str]]]:
    base = f"gs://{args.bucket}/{s['prefix']}/deploy/{version()}"
    gpu = None if args.serverless else gpu_settings(s)
    root = f"gs://{args.bucket}/{s['prefix']}"
    out = [("upload", ["gcloud", "storage", "cp", str(u.local), u.remote])
           for u in uploads(base, bundle, profile, pipeline, [HERE / "init.sh"]) + weight_uploads(args.weights, root)]
    if not args.serverless and not args.cluster:
        out.append(("create cluster", create_cluster(s, base, gpu)))
    if args.cluster:
        s = dict(s, name=args.cluster)
    out += [(st.name, job_command(st, s, base, bundle.name, profile.name, gpu, args.serverless)) for st in pipeline]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deploy/dataproc/submit.py", description=__doc__.split("\n\n")[0])
    add_arguments(ap, HERE / "cluster.yaml", ROOT / "conf" / "dataproc.yaml", "GCS")
    ap.add_argument("--cluster", help="submit to this running cluster instead of creating one")
    ap.add_argument("--execute", action="store_true", help="run the commands (default: print them)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing (the default)")
    args = ap.parse_args(argv)
    if args.execute and args.dry_run:
        print("submit.py: error: --execute and --dry-run contradict each other", file=sys.stderr)
        return 2
    try:
        refuse_secrets(list(argv if argv is not None else sys.argv[1:]), "the command line")
        s = load_settings(args.settings, args.set, Settings)
        args.bucket = args.bucket or s.get("bucket")
        if not args.bucket or args.bucket == "YOUR-BUCKET":
            raise DeployError("no bucket: pass --bucket or set bucket in the settings")
        check_bucket(args.bucket, "gs")
        pipeline = cluster_stages(args.stages.split(",") if args.stages else None)
        python = str(s["serverless"]["python"] if args.serverless else s["python"])
        stack = s["serverless"]["stack"] if args.serverless else s["stack"]
        check_flavor(s.get("bundle", "cpu"), pipeline)
        bundle = find_bundle(s.get("bundle", "cpu"), python, args.bundle)
        check_bundle(bundle, python, not args.execute, stack)
        profile = render_profile(Path(args.config), args.bucket, ROOT / ".cache" / "deploy" / "dataproc")
        lake = check_profile(profile)["lake"]
        todo = commands(s, args, pipeline, bundle, profile)
    except DeployError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    for name, cmd in todo:
        line = shlex.join(cmd)
        if not args.execute:
            print(redact(line))
            continue
        print(f"[{name}] {redact(line)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print("submit.py: error: gcloud is not installed (https://cloud.google.com/sdk/docs/install)",
                  file=sys.stderr)
            return 2
        print(f"[{name}] exit {rc} ({time.monotonic() - t0:.0f}s)", flush=True)
        if rc:
            print(f"submit.py: {name} failed (exit {rc}); the steps after it did not run. Logs: gcloud dataproc "
                  f"{'batches' if args.serverless else 'jobs'} list --region={s['region']}", file=sys.stderr)
            return 1
    if args.execute:
        print(f"done: outputs under {lake} (tables/, models/, datasets/, reports/index.html; each with a _SUMMARY.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
