"""Deployment: the one stage list, the EMR launcher against moto's EMR and S3 over HTTP (the real
boto3 client), its requests validated against botocore's service models, the Dataproc commands,
credentials refused and never printed, and a packed bundle running a stage under spark-submit.

gcloud cannot run here (no Google Cloud): --execute is tested with a stand-in `gcloud` on PATH that
records its arguments, which checks the order and the stop at the first failure, not Google's API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.validate import validate_parameters

from sparkml.pipeline import CLUSTER, DEMO, GPU_INFER, STAGES, TRAIN, stages
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))
from deploy.dataproc import submit  # noqa: E402
from deploy.emr import launch  # noqa: E402

CANARY_ID, CANARY_SECRET = "AKIACANARY0000000000", "canary/Secret+Key0000000000000000000000000"


def _validate(service: str, operation: str, params: dict) -> None:
    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    validate_parameters(params, model.input_shape)  # raises ParamValidationError on any bad field


def _bundle(tmp_path: Path, python: str = "3.12", stack: str | None = None) -> Path:
    """A small stand-in archive for the upload tests (the real one is built in the last test)."""
    src = tmp_path / f"env{python}"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "marker").write_text("instalearn test bundle")
    out = tmp_path / f"instalearn-test-gpu-py{python.replace('.', '')}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=".")
    Path(f"{out}.json").write_text(json.dumps({"python": python, **({"stack": stack} if stack else {})}))
    return out


def test_every_job_is_in_a_pipeline_and_make_demo_runs_the_list():
    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py")}
    listed = {s.job for s in STAGES}
    assert jobs - listed == set(), f"jobs in no pipeline: {sorted(jobs - listed)}"
    assert listed - jobs == set(), f"stages whose job does not exist: {sorted(listed - jobs)}"
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    make = (ROOT / "Makefile").read_text()
    demo_recipe = make[make.index("\ndemo:"):make.index("\ntest:")]
    assert "sparkml.pipeline demo" in demo_recipe and "$(SUBMIT) jobs/" not in demo_recipe
    cluster = [s.name for s in stages(CLUSTER)]
    assert cluster[:3] == ["ingest", "prepare_images", "dedup"] and cluster[-1] == "report"
    assert stages(DEMO)[0].name == "make_sample" and stages(DEMO)[-1].name == "report"
    for s in STAGES:  # presets a cluster job reads by path exist
        assert all((ROOT / f).is_file() for f in s.files), s


def test_emr_dry_run_prints_valid_requests_for_the_whole_pipeline(tmp_path, capsys):
    bundle = _bundle(tmp_path)
    assert launch.main(["--bucket", "bkt1", "--bundle", str(bundle), "--set", "gpu.count=2", "--dry-run"]) == 0
    req = json.loads(capsys.readouterr().out)
    flow, steps = req["run_job_flow"], req["add_job_flow_steps"]
    _validate("emr", "RunJobFlow", flow)
    _validate("emr", "AddJobFlowSteps", dict(steps, JobFlowId="j-TEST"))
    assert flow["ReleaseLabel"].startswith("emr-8.")  # Spark 4
    assert flow["LogUri"] == "s3://bkt1/instalearn/logs/"
    boot = flow["BootstrapActions"][0]["ScriptBootstrapAction"]
    assert boot["Path"].endswith("/deploy/bootstrap.sh") and boot["Args"] == ["3.12"]
    classes = {c["Classification"] for c in flow["Configurations"]}
    assert {"spark-defaults", "spark-env", "yarn-site", "capacity-scheduler"} <= classes
    roles = [g["InstanceRole"] for g in flow["Instances"]["InstanceGroups"]]
    assert roles == ["MASTER", "CORE", "TASK"]
    assert [s["Name"] for s in steps["Steps"]] == [s.name for s in stages(CLUSTER)]
    base = "s3://bkt1/instalearn/deploy/"
    for step, stage in zip(steps["Steps"], stages(CLUSTER)):
        args = step["HadoopJarStep"]["Args"]
        assert step["HadoopJarStep"]["Jar"] == "command-runner.jar"
        assert args[:3] == ["spark-submit", "--deploy-mode", "cluster"]
        assert args[args.index("--archives") + 1] == f"{base}0.1.0/{bundle.name}#environment"
        confs = dict(a.split("=", 1) for a in args[1:] if "=" in a and a.startswith("spark."))
        assert confs["spark.pyspark.python"] == "./environment/bin/python"
        entry = next(a for a in args if a.endswith(".py"))
        assert entry == f"{base}0.1.0/{stage.path}"
        job_args = args[args.index(entry) + 1:]
        assert job_args[:2] == ["--config", "emr.yaml"]
        if stage.needs == TRAIN:
            assert confs["spark.dynamicAllocation.enabled"] == "false"
            assert confs["spark.task.resource.gpu.amount"] == "1" and confs["spark.executor.instances"] == "2"
            assert "train.mode=cluster" in job_args and "train.processes=2" in job_args
            preset = job_args[job_args.index("--preset") + 1]
            assert preset.endswith(".yaml") and f"{base}0.1.0/conf/train/{preset}" in args[args.index("--files") + 1]
        elif stage.needs == GPU_INFER:
            assert confs["spark.task.resource.gpu.amount"] == "0.25"
        else:
            assert "spark.task.resource.gpu.amount" not in confs
    uploaded = {u["to"] for u in req["uploads"]}
    assert {f"{base}0.1.0/{s.path}" for s in stages(CLUSTER)} <= uploaded
    assert f"{base}0.1.0/conf/emr.yaml" in uploaded and f"{base}0.1.0/{bundle.name}" in uploaded


def test_the_emr7_profile_takes_the_spark35_bundle_and_refuses_the_other(tmp_path, capsys):
    """deploy/emr/cluster-emr7.yaml extends cluster.yaml: EMR 7.x, Python 3.11, the spark35 stack."""
    emr7 = ["--settings", str(ROOT / "deploy" / "emr" / "cluster-emr7.yaml"), "--bucket", "bkt1", "--dry-run"]
    assert launch.main([*emr7, "--bundle", str(_bundle(tmp_path, "3.11", "spark35"))]) == 0
    flow = json.loads(capsys.readouterr().out)["run_job_flow"]
    _validate("emr", "RunJobFlow", flow)
    assert flow["ReleaseLabel"].startswith("emr-7.") and int(flow["ReleaseLabel"].split(".")[1]) >= 1
    assert flow["BootstrapActions"][0]["ScriptBootstrapAction"]["Args"] == ["3.11"]
    assert flow["Instances"]["InstanceGroups"][0]["InstanceType"] == "m6i.2xlarge"  # the rest from cluster.yaml
    assert launch.main([*emr7, "--bundle", str(_bundle(tmp_path / "b", "3.11", "spark4"))]) == 2
    assert "holds the spark4 stack, the settings say spark35" in capsys.readouterr().err


def test_emr_serverless_dry_run(tmp_path, capsys):
    assert launch.main(["--bucket", "bkt1", "--bundle", str(_bundle(tmp_path)), "--serverless", "--dry-run",
                        "--set", "serverless.application_id=00abc", "--set",
                        "serverless.execution_role_arn=arn:aws:iam::123456789012:role/emr-serverless"]) == 0
    runs = json.loads(capsys.readouterr().out)["start_job_run"]
    assert [r["name"] for r in runs] == [f"instalearn-{s.name}" for s in stages(CLUSTER)]
    for r in runs:
        _validate("emr-serverless", "StartJobRun", r)
        params = r["jobDriver"]["sparkSubmit"]["sparkSubmitParameters"]
        assert "#environment" in params and "spark.emr-serverless.driverEnv.PYSPARK_PYTHON=./environment/bin/python" in params


@pytest.mark.s3
def test_emr_launcher_against_moto_uploads_creates_the_cluster_and_adds_every_step(moto_endpoint, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="deploy-test")
    bundle = _bundle(tmp_path)
    args = ["--bucket", "deploy-test", "--bundle", str(bundle), "--set", "gpu.count=1"]
    assert launch.main([*args, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert launch.main([*args, "--no-wait"]) == 0
    out = capsys.readouterr()
    assert CANARY_SECRET not in out.out + out.err and CANARY_ID not in out.out + out.err
    for u in dry["uploads"]:  # every upload landed, byte for byte
        key = u["to"][len("s3://deploy-test/"):]
        body = s3.get_object(Bucket="deploy-test", Key=key)["Body"].read()
        local = Path(u["from"]) if Path(u["from"]).is_absolute() else ROOT / u["from"]
        assert body == local.read_bytes(), key
        assert CANARY_SECRET.encode() not in body
    assert b"YOUR-BUCKET" not in s3.get_object(Bucket="deploy-test", Key="instalearn/deploy/0.1.0/conf/emr.yaml")["Body"].read()
    emr = boto3.client("emr", endpoint_url=moto_endpoint)
    (cluster,) = emr.list_clusters()["Clusters"]
    desc = emr.describe_cluster(ClusterId=cluster["Id"])["Cluster"]
    assert desc["ReleaseLabel"] == dry["run_job_flow"]["ReleaseLabel"] and desc["LogUri"] == "s3://deploy-test/instalearn/logs/"
    assert "Spark" in {a["Name"] for a in desc["Applications"]}
    assert [c["Classification"] for c in desc["Configurations"]] == \
           [c["Classification"] for c in dry["run_job_flow"]["Configurations"]]
    (boot,) = emr.list_bootstrap_actions(ClusterId=cluster["Id"])["BootstrapActions"]
    assert boot["ScriptPath"] == dry["run_job_flow"]["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"]
    groups = {g["InstanceGroupType"]: g for g in emr.list_instance_groups(ClusterId=cluster["Id"])["InstanceGroups"]}
    assert groups["TASK"]["InstanceType"] == "g6.4xlarge"
    got = {s["Name"]: s["Config"]["Args"] for s in emr.list_steps(ClusterId=cluster["Id"])["Steps"]}
    assert got == {s["Name"]: s["HadoopJarStep"]["Args"] for s in dry["add_job_flow_steps"]["Steps"]}

    # the same steps onto a running cluster: no second cluster
    assert launch.main([*args, "--cluster-id", cluster["Id"], "--stages", "ingest,prepare_images", "--no-wait"]) == 0
    assert len(emr.list_clusters()["Clusters"]) == 1
    assert len(emr.list_steps(ClusterId=cluster["Id"])["Steps"]) == len(stages(CLUSTER)) + 2


def test_a_settings_file_or_option_holding_keys_is_refused_without_echoing_them(tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text((ROOT / "deploy" / "emr" / "cluster.yaml").read_text()
                   + f"\nextra:\n  aws_secret_access_key: {CANARY_SECRET}\n")
    for argv in (["--settings", str(bad), "--bucket", "bkt", "--dry-run"],
                 ["--bucket", "bkt", "--dry-run", "--set", f"subnet={CANARY_ID}"]):
        for main in (launch.main, submit.main):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and ("credential" in err[0] or "key" in err[0]), err
            assert CANARY_SECRET not in err[0] and CANARY_ID not in err[0]
    profile = tmp_path / "emr.yaml"
    profile.write_text("lake: s3://b/lake\ns3:\n  endpoint: https://s3.amazonaws.com\npassword: hunter2\n")
    assert launch.main(["--bucket", "bkt", "--config", str(profile), "--dry-run"]) == 2
    assert "hunter2" not in capsys.readouterr().err


def test_the_data_bundle_is_refused_for_stages_that_need_torch(capsys):
    for main in (launch.main, submit.main):
        assert main(["--bucket", "bkt", "--dry-run", "--set", "bundle=data"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "extract_features" in err[0] and "train_cnn_city" in err[0], err
        assert main(["--bucket", "bkt", "--dry-run", "--set", "bundle=data", "--stages", "ingest,dedup"]) == 0
        capsys.readouterr()


def test_dataproc_commands_for_the_whole_pipeline_and_serverless(tmp_path, capsys):
    bundle = _bundle(tmp_path)
    assert submit.main(["--bucket", "gbkt", "--bundle", str(bundle), "--set", "accelerator.type=nvidia-l4",
                        "--set", "accelerator.count=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    import shlex

    cmds = [shlex.split(x) for x in lines]
    uploads = [c for c in cmds if c[:3] == ["gcloud", "storage", "cp"]]
    (create,) = [c for c in cmds if c[:4] == ["gcloud", "dataproc", "clusters", "create"]]
    jobs = [c for c in cmds if c[:5] == ["gcloud", "dataproc", "jobs", "submit", "pyspark"]]
    assert len(uploads) + 1 + len(jobs) == len(cmds) and cmds.index(create) == len(uploads)
    assert "--image-version=3.0-debian12" in create and "--worker-accelerator=type=nvidia-l4,count=1" in create
    assert "--metadata=instalearn-python=3.12,gpu-driver-provider=NVIDIA,gpu-driver-version=580.95.05" in create
    init = next(a for a in create if a.startswith("--initialization-actions="))
    assert init.endswith("/deploy/init.sh") and "install_gpu_driver.sh" in init
    base = "gs://gbkt/instalearn/deploy/0.1.0"
    assert [c[5] for c in jobs] == [f"{base}/{s.path}" for s in stages(CLUSTER)]
    for c, stage in zip(jobs, stages(CLUSTER)):
        assert f"--archives={base}/{bundle.name}#environment" in c and "--cluster=instalearn" in c
        props = dict(p.split("=", 1) for p in next(a for a in c if a.startswith("--properties="))
                     [len("--properties=^#^"):].split("#"))
        assert props["spark.submit.deployMode"] == "cluster" and props["spark.pyspark.python"] == "./environment/bin/python"
        assert c[c.index("--") + 1:][:2] == ["--config", "dataproc.yaml"]
        if stage.needs == TRAIN:
            assert props["spark.dynamicAllocation.enabled"] == "false" and props["spark.task.resource.gpu.amount"] == "1"
    assert submit.main(["--bucket", "gbkt", "--bundle", str(bundle), "--serverless"]) == 0
    batches = [shlex.split(x) for x in capsys.readouterr().out.splitlines() if " batches submit " in x]
    assert len(batches) == len(stages(CLUSTER)) and all("--version=3.0" in b for b in batches)
    # a bundle built for another Python than the target's is refused before anything runs
    old = _bundle(tmp_path / "old", "3.11", "spark35")
    assert submit.main(["--bucket", "gbkt", "--bundle", str(old), "--serverless", "--execute"]) == 2
    assert "Python 3.11" in capsys.readouterr().err
    # images 2.2 / 2.3 (Spark 3.5): the 2.x profile over cluster.yaml takes that bundle
    assert submit.main(["--settings", str(ROOT / "deploy" / "dataproc" / "cluster-2x.yaml"), "--bucket", "gbkt",
                        "--bundle", str(old)]) == 0
    (create,) = [shlex.split(x) for x in capsys.readouterr().out.splitlines() if " clusters create " in x]
    assert "--image-version=2.2-debian12" in create and "--metadata=instalearn-python=3.11" in create


def test_dataproc_execute_runs_in_order_and_stops_at_the_first_failure(tmp_path, capsys, monkeypatch):
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *\"jobs submit\"*jobs/dedup.py*) exit 3;; esac\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert submit.main(["--bucket", "gbkt", "--bundle", str(_bundle(tmp_path)), "--execute"]) == 1
    ran = log.read_text().splitlines()
    assert "dataproc clusters create" in next(x for x in ran if "storage cp" not in x)
    jobs = [x for x in ran if "jobs submit" in x]
    assert [j.split()[4].rsplit("/", 1)[1] for j in jobs] == ["ingest.py", "prepare_images.py", "dedup.py"]
    assert "dedup failed (exit 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_packed_bundle_runs_a_stage_under_spark_submit(tmp_path, sample):
    """make bundle's data flavor (no torch: small enough for CI), unpacked into a folder, runs
    ingest with spark.pyspark.python (and the driver's) pointing into it, as a cluster runs it:
    the project comes from the archive, Spark from spark-submit's installation."""
    from deploy import bundle

    root, truth = sample
    # gzip level 0: the archive is unpacked at once here (level 4, make bundle's, packs 1.1 GiB to 428 MiB)
    info = bundle.build("data", tmp_path / "out", sys.executable, None, bundle.TORCH_CPU_INDEX, 0)
    env = tmp_path / "unpacked"
    env.mkdir()
    with tarfile.open(tmp_path / "out" / info["archive"]) as tar:
        tar.extractall(env)
    py = env / "bin" / "python"
    probe = subprocess.run([py, "-c", "import sparkml, importlib.util as u; print(sparkml.__file__); "
                                      "print(u.find_spec('torch'), u.find_spec('pyspark'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert probe.stdout.splitlines() == [str(env / "lib" / f"python{minor}" / "site-packages" / "sparkml" / "__init__.py"),
                                         "None None"]
    spark_home = Path(__import__("pyspark").__file__).parent
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH")}
    run_env.update(SPARK_HOME=str(spark_home), SPARK_CONF_DIR=str(ROOT / "conf" / "spark"))
    lake = tmp_path / "lake"
    done = subprocess.run(
        [str(spark_home / "bin" / "spark-submit"), "--master", "local[2,4]", "--driver-memory", "2g",
         "--conf", f"spark.pyspark.python={py}", "--conf", f"spark.pyspark.driver.python={py}",
         str(ROOT / "jobs" / "ingest.py"), "--config", str(ROOT / "conf" / "local.yaml"), "--set", f"lake={lake}",
         "--set", f"source.path={root / 'manifest.jsonl'}", "--set", "source.layout=manifest"],
        cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((lake / "tables" / "posts" / "_SUMMARY.json").read_text())
    assert summary["balanced"] and summary["input_rows"] == truth["manifest_rows"]
    assert info["bytes"] > 0 and info["python"] == minor
    assert info["stack"] == ("spark35" if minor == "3.11" else "spark4")


def test_staged_weights_travel_to_the_bucket_for_clusters_without_internet(tmp_path, weights, capsys):
    """--weights FILE uploads the file and its card beside it to <bucket>/<prefix>/weights/ (both
    launchers); a file without its card is refused with one line."""
    staged = weights["mobilenet_v2"].removeprefix("file://")
    bundle = _bundle(tmp_path)
    assert launch.main(["--bucket", "bkt1", "--bundle", str(bundle), "--dry-run", "--weights", staged]) == 0
    ups = {u["to"]: u["from"] for u in json.loads(capsys.readouterr().out)["uploads"]}
    assert ups["s3://bkt1/instalearn/weights/mobilenet_v2.pth"] == staged
    assert ups["s3://bkt1/instalearn/weights/mobilenet_v2.json"] == staged.removesuffix(".pth") + ".json"
    assert submit.main(["--bucket", "gbkt", "--bundle", str(bundle), "--weights", staged]) == 0
    out = capsys.readouterr().out
    assert f"gcloud storage cp {staged} gs://gbkt/instalearn/weights/mobilenet_v2.pth" in out
    assert "gs://gbkt/instalearn/weights/mobilenet_v2.json" in out
    bare = tmp_path / "bare.pth"
    bare.write_bytes(b"x")
    for main in (launch.main, submit.main):
        assert main(["--bucket", "bkt", "--dry-run", "--weights", str(bare)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs the file and its card bare.json" in err[0], err
