"""Run the pipeline on AWS EMR: upload the packed environment, jobs and profile to S3, create a
cluster (or use --cluster-id), add the cluster stages of sparkml.pipeline as steps, and wait
with a progress line per step. --dry-run prints the exact API requests as JSON and sends none.
--serverless submits the same stages as EMR Serverless job runs instead.

    python deploy/emr/launch.py --bucket my-bucket --dry-run
    python deploy/emr/launch.py --bucket my-bucket                      # create, run, wait
    python deploy/emr/launch.py --cluster-id j-XXXX --stages ingest,prepare_images
    python deploy/emr/launch.py --serverless --set serverless.application_id=00f... --dry-run

Settings: deploy/emr/cluster.yaml (--settings, --set key=value); job settings: conf/emr.yaml
(--config), whose YOUR-BUCKET is replaced by the bucket. Credentials: the environment, an SSO
session or the instance profile, never a file: a settings file or option holding keys is refused.
Exit codes: 0 done (or dry run), 1 a step failed, 2 bad options or settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from deploy.common import (ENV, Stack, PYTHON, ROOT, DeployError, Upload, add_arguments, check_bucket, check_bundle,  # noqa: E402
                           check_profile, check_flavor, cluster_stages, find_bundle, load_settings, redact,
                           refuse_secrets, render_profile, stage_args, stage_conf, uploads, version, weight_uploads)

DISCOVERY = "/usr/lib/spark/scripts/gpu/getGpusResources.sh"  # shipped with EMR's Spark


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Node(_Strict):
    type: str = Field(min_length=1)
    count: int = Field(1, ge=0)
    market: Literal["ON_DEMAND", "SPOT"] = "ON_DEMAND"


class _Gpu(_Node):
    count: int = Field(0, ge=0)
    gpus_per_node: int = Field(1, ge=1)
    tasks_per_gpu: int = Field(4, ge=1)


class _Serverless(_Strict):
    application_id: str | None = None
    execution_role_arn: str | None = None


class Settings(_Strict):
    """deploy/emr/cluster.yaml: every key typed, unknown keys refused (--set included)."""

    name: str = Field(min_length=1)
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    bucket: str
    prefix: str = Field(pattern=r"^[A-Za-z0-9._/-]+$")
    release_label: str = Field(pattern=r"^emr-\d+\.\d+\.\d+$")
    bundle: Literal["gpu", "cpu", "data"] = "gpu"
    python: str = Field("3.12", pattern=r"^3\.\d+$")
    stack: Stack = "spark4"
    primary: _Node
    core: _Node
    gpu: _Gpu = Field(default_factory=lambda: _Gpu(type="g6.4xlarge"))
    executors: int = Field(4, ge=1)
    subnet: str | None = None
    service_role: str = Field(min_length=1)
    instance_profile: str = Field(min_length=1)
    idle_timeout: int = Field(3600, ge=60, le=7 * 24 * 3600)
    spark_defaults: dict[str, str | int | float | bool] = Field(default_factory=dict)
    serverless: _Serverless = Field(default_factory=_Serverless)


def gpu_settings(s: dict) -> dict | None:
    g = s.get("gpu") or {}
    if not int(g.get("count") or 0):
        return None
    return {"per_node": int(g.get("gpus_per_node", 1)), "nodes": int(g["count"]),
            "tasks_per_gpu": int(g.get("tasks_per_gpu", 4)), "discovery": DISCOVERY}


def _kv(props: dict) -> dict:
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in props.items()}


def configurations(s: dict, gpu: dict | None) -> list[dict]:
    """Cluster-wide classifications: spark-defaults, spark-env (the archive's Python), and
    YARN's GPU scheduling on GPU clusters."""
    out = [
        {"Classification": "spark-defaults", "Properties": _kv(s.get("spark_defaults") or {})},
        {"Classification": "spark-env", "Configurations": [
            {"Classification": "export", "Properties": {"PYSPARK_PYTHON": PYTHON}}]},
    ]
    if gpu:
        out += [
            {"Classification": "yarn-site", "Properties": {
                "yarn.nodemanager.resource-plugins": "yarn.io/gpu",
                "yarn.resource-types": "yarn.io/gpu",
                "yarn.nodemanager.resource-plugins.gpu.allowed-gpu-devices": "auto",
                "yarn.nodemanager.resource-plugins.gpu.path-to-discovery-executables": "/usr/bin",
                "yarn.nodemanager.linux-container-executor.cgroups.mount": "true",
                "yarn.nodemanager.linux-container-executor.cgroups.mount-path": "/sys/fs/cgroup",
                "yarn.nodemanager.linux-container-executor.cgroups.hierarchy": "yarn",
                "yarn.nodemanager.container-executor.class":
                    "org.apache.hadoop.yarn.server.nodemanager.LinuxContainerExecutor"}},
            {"Classification": "container-executor", "Properties": {}, "Configurations": [
                {"Classification": "gpu", "Properties": {"module.enabled": "true"}},
                {"Classification": "cgroups", "Properties": {"root": "/sys/fs/cgroup", "yarn-hierarchy": "yarn"}}]},
            {"Classification": "capacity-scheduler", "Properties": {
                "yarn.scheduler.capacity.resource-calculator":
                    "org.apache.hadoop.yarn.util.resource.DominantResourceCalculator"}},
        ]
    return out


def run_job_flow_request(s: dict, base: str, log_uri: str, gpu: dict | None) -> dict:
    groups = [
        {"Name": "primary", "InstanceRole": "MASTER", "InstanceType": s["primary"]["type"], "InstanceCount": 1,
         "Market": "ON_DEMAND"},
        {"Name": "core", "InstanceRole": "CORE", "InstanceType": s["core"]["type"],
         "InstanceCount": int(s["core"]["count"]), "Market": s["core"].get("market", "ON_DEMAND")},
    ]
    if gpu:
        groups.append({"Name": "gpu", "InstanceRole": "TASK", "InstanceType": s["gpu"]["type"],
                       "InstanceCount": gpu["nodes"], "Market": s["gpu"].get("market", "ON_DEMAND")})
    instances = {"InstanceGroups": groups, "KeepJobFlowAliveWhenNoSteps": False, "TerminationProtected": False}
    if s.get("subnet"):
        instances["Ec2SubnetId"] = s["subnet"]
    return {
        "Name": s["name"], "ReleaseLabel": s["release_label"], "LogUri": log_uri,
        "Applications": [{"Name": "Spark"}, {"Name": "Hadoop"}],
        "Instances": instances,
        "BootstrapActions": [{"Name": "instalearn OS packages",
                              "ScriptBootstrapAction": {"Path": f"{base}/deploy/bootstrap.sh", "Args": [s["python"]]}}],
        "Configurations": configurations(s, gpu),
        "JobFlowRole": s["instance_profile"], "ServiceRole": s["service_role"],
        "AutoTerminationPolicy": {"IdleTimeout": int(s["idle_timeout"])},
        "VisibleToAllUsers": True,
        "Tags": [{"Key": "app", "Value": "instalearn"}],
    }


def submit_parts(stage, base: str, archive: str, profile: str, gpu: dict | None, executors: int) -> tuple:
    """(--archives/--files/--conf options, entry point, job arguments) of one stage."""
    files = [f"{base}/conf/{profile}"] + [f"{base}/{f}" for f in stage.files]
    opts = ["--archives", f"{base}/{archive}#{ENV}", "--files", ",".join(files)]
    for k, v in stage_conf(stage, gpu, executors).items():
        opts += ["--conf", f"{k}={v}"]
    return opts, f"{base}/{stage.path}", stage_args(stage, profile, gpu, executors)


def steps_request(pipeline, base: str, archive: str, profile: str, gpu: dict | None, executors: int) -> list[dict]:
    steps = []
    for stage in pipeline:
        opts, entry, args = submit_parts(stage, base, archive, profile, gpu, executors)
        steps.append({"Name": stage.name, "ActionOnFailure": "CANCEL_AND_WAIT", "HadoopJarStep": {
            "Jar": "command-runner.jar",
            "Args": ["spark-submit", "--deploy-mode", "cluster", *opts, entry, *args]}})
    return steps


def serverless_requests(s: dict, pipeline, base: str, archive: str, profile: str, log_uri: str) -> list[dict]:
    sl = s.get("serverless") or {}
    out = []
    for stage in pipeline:
        opts, entry, args = submit_parts(stage, base, archive, profile, None, int(s.get("executors", 4)))
        # EMR Serverless reads the Python of driver and executors from these environment settings
        opts += ["--conf", f"spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON={PYTHON}",
                 "--conf", f"spark.emr-serverless.driverEnv.PYSPARK_PYTHON={PYTHON}",
                 "--conf", f"spark.executorEnv.PYSPARK_PYTHON={PYTHON}"]
        out.append({"applicationId": sl.get("application_id") or "<serverless.application_id>",
                    "executionRoleArn": sl.get("execution_role_arn") or "<serverless.execution_role_arn>",
                    "name": f"instalearn-{stage.name}",
                    "clientToken": str(uuid.uuid4()),  # a retried request starts no second run
                    "jobDriver": {"sparkSubmit": {"entryPoint": entry, "entryPointArguments": args,
                                                  "sparkSubmitParameters": " ".join(opts)}},
                    "configurationOverrides": {"monitoringConfiguration": {
                        "s3MonitoringConfiguration": {"logUri": log_uri}}}})
    return out


def _upload_json(items: list[Upload]) -> list[dict]:
    return [{"from": str(u.local.relative_to(ROOT) if u.local.is_relative_to(ROOT) else u.local), "to": u.remote,
             "bytes": u.local.stat().st_size if u.local.exists() else None} for u in items]


def do_uploads(items: list[Upload], region: str) -> None:
    import boto3

    s3 = boto3.client("s3", region_name=region)
    for u in items:
        bucket, _, key = u.remote[len("s3://"):].partition("/")
        s3.upload_file(str(u.local), bucket, key)
        print(f"uploaded {u.local.name} -> {u.remote}", flush=True)


def wait_steps(emr, cluster_id: str, step_ids: list[str], names: list[str], log_uri: str, poll: float) -> int:
    """A line per step state change (state, elapsed); 1 at the first failed or cancelled step."""
    t0, seen = time.monotonic(), {}
    while True:
        for sid, name in zip(step_ids, names):
            state = emr.describe_step(ClusterId=cluster_id, StepId=sid)["Step"]["Status"]["State"]
            if seen.get(sid) != state:
                seen[sid] = state
                print(f"step {name}: {state} ({time.monotonic() - t0:.0f}s)", flush=True)
            if state in ("FAILED", "CANCELLED", "INTERRUPTED"):
                print(f"step {name} {state.lower()}: logs under {log_uri}{cluster_id}/steps/{sid}/ "
                      f"(stderr.gz, and the YARN container logs under {log_uri}{cluster_id}/containers/)",
                      file=sys.stderr)
                return 1
        if all(seen.get(s) == "COMPLETED" for s in step_ids):
            return 0
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deploy/emr/launch.py", description=__doc__.split("\n\n")[0])
    add_arguments(ap, HERE / "cluster.yaml", ROOT / "conf" / "emr.yaml", "S3")
    ap.add_argument("--cluster-id", help="add the steps to this running cluster instead of creating one")
    ap.add_argument("--dry-run", action="store_true", help="print the API requests as JSON; send nothing")
    ap.add_argument("--no-wait", action="store_true", help="return once the steps are added")
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between progress checks")
    args = ap.parse_args(argv)
    try:
        refuse_secrets(list(argv if argv is not None else sys.argv[1:]), "the command line")
        s = load_settings(args.settings, args.set, Settings)
        bucket = args.bucket or s.get("bucket")
        if not bucket or bucket == "YOUR-BUCKET":
            raise DeployError("no bucket: pass --bucket or set bucket in the settings")
        check_bucket(bucket, "s3")
        pipeline = cluster_stages(args.stages.split(",") if args.stages else None)
        root = f"s3://{bucket}/{s['prefix']}"
        base, log_uri = f"{root}/deploy/{version()}", f"{root}/logs/"
        python = str(s["python"])
        bundle = find_bundle(s.get("bundle", "gpu"), python, args.bundle)
        check_bundle(bundle, python, args.dry_run, s["stack"])
        gpu = None if args.serverless else gpu_settings(s)
        check_flavor(s.get("bundle", "gpu"), pipeline)
        profile = render_profile(Path(args.config), bucket, ROOT / ".cache" / "deploy" / "emr")
        executors = int(s.get("executors", 4))
        items = uploads(base, bundle, profile, pipeline, [HERE / "bootstrap.sh"]) + weight_uploads(args.weights, root)
        if args.serverless:
            request = {"uploads": _upload_json(items),
                       "start_job_run": serverless_requests(s, pipeline, base, bundle.name, profile.name, log_uri)}
        else:
            request = {"uploads": _upload_json(items),
                       "run_job_flow": None if args.cluster_id else run_job_flow_request(s, base, log_uri, gpu),
                       "add_job_flow_steps": {"JobFlowId": args.cluster_id or "<the new cluster's id>",
                                              "Steps": steps_request(pipeline, base, bundle.name, profile.name,
                                                                     gpu, executors)}}
        if args.dry_run:
            print(redact(json.dumps(request, indent=1)))  # nothing key-shaped is printed, whatever slipped in
            return 0
        return execute(request, items, s, args, pipeline, log_uri, check_profile(profile)["lake"])
    except DeployError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2


def execute(request: dict, items: list[Upload], s: dict, args, pipeline, log_uri: str, lake: str) -> int:
    import boto3
    import botocore.exceptions

    region = s["region"]
    try:
        do_uploads(items, region)
        if args.serverless:
            client = boto3.client("emr-serverless", region_name=region)
            for req in request["start_job_run"]:
                run = client.start_job_run(**req)
                print(f"job run {req['name']}: {run['jobRunId']}", flush=True)
                if args.no_wait:
                    continue
                while True:
                    state = client.get_job_run(applicationId=req["applicationId"],
                                               jobRunId=run["jobRunId"])["jobRun"]["state"]
                    if state in ("SUCCESS", "FAILED", "CANCELLED"):
                        break
                    time.sleep(args.poll)
                print(f"job run {req['name']}: {state}", flush=True)
                if state != "SUCCESS":
                    print(f"logs under {log_uri}applications/{req['applicationId']}/jobs/{run['jobRunId']}/",
                          file=sys.stderr)
                    return 1
            return 0
        emr = boto3.client("emr", region_name=region)
        cluster_id = args.cluster_id
        if not cluster_id:
            cluster_id = emr.run_job_flow(**request["run_job_flow"])["JobFlowId"]
            print(f"cluster {cluster_id} starting ({s['release_label']}); logs: {log_uri}{cluster_id}/", flush=True)
        steps = dict(request["add_job_flow_steps"], JobFlowId=cluster_id)
        step_ids = emr.add_job_flow_steps(**steps)["StepIds"]
        print(f"{len(step_ids)} steps added to {cluster_id}: {', '.join(st.name for st in pipeline)}", flush=True)
        if args.no_wait:
            return 0
        rc = wait_steps(emr, cluster_id, step_ids, [st.name for st in pipeline], log_uri, args.poll)
        if rc == 0:
            print(f"done: outputs under {lake} (tables/, models/, datasets/, reports/index.html; each with a "
                  f"_SUMMARY.json); logs: {log_uri}{cluster_id}/")
        return rc
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        print(f"launch.py: error: {redact(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, botocore.exceptions.NoCredentialsError) else 1


if __name__ == "__main__":
    sys.exit(main())
