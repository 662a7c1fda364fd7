"""What the EMR launcher and the Dataproc submitter share: the cluster settings file, the
refusal of credentials in any file or option they read, the files a run uploads, and each
stage's spark-submit settings (from the one stage list, sparkml.pipeline).

Credentials come only from the environment, instance profiles or workload identity: nothing
here reads, prints or uploads a key.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import ConfigError, merge, read_yaml  # noqa: E402
from sparkml.pipeline import CLUSTER, GPU_INFER, TRAIN, Stage, stages# noqa: E402

# The pinned sets a bundle can hold (docs/platforms.md; deploy/bundle.py builds either).
Stack = Literal["spark4", "spark35"]
ENV = "environment"  # the archive's alias: executors and the driver run ./environment/bin/python
PYTHON = f"./{ENV}/bin/python"


class DeployError(Exception):
    """A bad option, settings file or secret: the launcher prints one line and exits 2."""


# ------------------------------------------------------------------------------------ secrets

_SECRET_WORDS = (r"(?:secret|password|passwd|access[._-]?key|session[._-]?token|private[._-]?key|credential|"
                 r"api[._-]?key|token)")
_SECRET_KEY = re.compile(_SECRET_WORDS, re.I)
# an AWS access key id, a PEM private key, a service-account JSON, or a 40-character AWS secret access
# key (base64 letters with upper and lower case and a digit or / +: not a 40-hex-digit git sha)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:|"
                           r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
                           r"(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def refuse_secrets(tree, where: str, path: str = "") -> None:
    """DeployError when a settings tree holds what looks like a credential: a key named like one
    with a value, or a value shaped like an AWS access key id or a private key. The message names
    the place, never the value."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = f"{path}.{k}" if path else str(k)
            if _SECRET_KEY.search(str(k)) and v not in (None, "", [], {}):
                raise DeployError(f"{where}: {here} looks like a credential; credentials come from the environment, "
                                  f"an instance profile or workload identity, never from a file or option")
            refuse_secrets(v, where, here)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            refuse_secrets(v, where, f"{path}[{i}]")
    elif isinstance(tree, str) and _SECRET_VALUE.search(tree):
        raise DeployError(f"{where}: {path or 'a value'} holds what looks like a key; credentials come from the "
                          f"environment, an instance profile or workload identity")


def load_settings(path: str | Path, overrides: list[str] = (), schema: type | None = None) -> dict:
    """A YAML settings file (safe_load) with key=value overrides (dotted keys), secrets refused,
    validated against `schema` (a pydantic model: unknown keys and wrong types are one line).
    `extends: other.yaml` (beside the file) reads that one first and the file's keys over it."""
    try:
        tree, seen = read_yaml(path), [Path(path).resolve()]
        while "extends" in tree:
            base = seen[-1].parent / str(tree.pop("extends"))
            if base.resolve() in seen:
                raise DeployError(f"{path}: extends {base.name} in a loop")
            seen.append(base.resolve())
            tree = merge(read_yaml(base), tree)
    except ConfigError as e:
        raise DeployError(str(e)) from None
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise DeployError(f"--set {text!r}: expected key=value")
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DeployError(f"--set {key}: {part} is not a section")
        node[last] = yaml.safe_load(value) if value else ""
    refuse_secrets(tree, str(path))
    if schema is None:
        return tree
    from pydantic import ValidationError

    try:
        return schema.model_validate(tree).model_dump()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "the settings"
        if first["type"] == "extra_forbidden":
            raise DeployError(f"{path}: unknown setting {loc!r}") from None
        if first["type"] == "missing":
            raise DeployError(f"{path}: setting {loc!r} is missing") from None
        raise DeployError(f"{path}: setting {loc!r}: {first['msg']} (got {first.get('input')!r})") from None


# ------------------------------------------------------------------------------------ bucket names

_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def check_bucket(name: str, store: str) -> str:
    """The bucket name, or DeployError when S3's (store "s3") or GCS's ("gs") naming rules refuse
    it: lower-case letters, digits, hyphens and dots (GCS: also underscores), 3-63 characters
    (GCS: up to 222 with dots, 63 between dots), a letter or digit at both ends, no '..', not an
    IP address; S3 also no 'xn--' / 'sthree-' prefix and no '-s3alias' / '--ol-s3' suffix; GCS
    no 'goog' prefix and no 'google' in it."""
    rule = _S3_BUCKET if store == "s3" else _GCS_BUCKET
    bad = (not isinstance(name, str) or not rule.match(name) or ".." in name or _IP.match(name)
           or (store == "s3" and (name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3"))))
           or (store == "gs" and (name.startswith("goog") or "google" in name
                                  or any(len(part) > 63 for part in name.split(".")))))
    if bad:
        what = "S3" if store == "s3" else "GCS"
        raise DeployError(f"bucket {name!r} is not a valid {what} bucket name (lower-case letters, digits, hyphens"
                          f"{', underscores' if store == 'gs' else ''} and dots, 3-63 characters, a letter or digit "
                          "at both ends)")
    return name


def check_profile(path: str | Path) -> dict:
    """The job profile (conf/emr.yaml, conf/dataproc.yaml): valid YAML, no credentials, a lake."""
    tree = load_settings(path)
    if not str(tree.get("lake", "")).strip():
        raise DeployError(f"{path}: lake is not set")
    if "YOUR-BUCKET" in yaml.safe_dump(tree):
        raise DeployError(f"{path}: replace YOUR-BUCKET with your bucket (or pass --bucket to rewrite it)")
    return tree


# ------------------------------------------------------------------------------------ bundle, profile, uploads

BUNDLES = ROOT / ".cache" / "bundle"


def version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def find_bundle(flavor: str, python: str, given: str | None) -> Path:
    """The packed environment to upload: --bundle, else `make bundle`'s output of the flavor."""
    if given:
        return Path(given)
    name = f"instalearn-{version()}-{flavor}-py{python.replace('.', '')}.tar.gz"
    return BUNDLES / name


def check_bundle(bundle: Path, python: str, dry_run: bool, stack: str | None = None) -> None:
    """The archive exists (unless dry_run) and was built for the cluster's Python and stack
    (docs/platforms.md: spark4 for Spark 4 platforms, spark35 for Spark 3.5 ones)."""
    if not bundle.is_file():
        if dry_run:
            return
        raise DeployError(f"{bundle}: no such archive; build it with `make bundle` (or pass --bundle)")
    info = Path(f"{bundle}.json")
    if info.is_file():
        meta = json.loads(info.read_text())
        built, packed = meta["python"], meta.get("stack")
        if built != python:
            raise DeployError(f"{bundle.name} was built with Python {built}, the cluster runs {python}: rebuild it with "
                              f"`python -m deploy.bundle --python python{python}`")
        if stack and packed and packed != stack:
            raise DeployError(f"{bundle.name} holds the {packed} stack, the settings say {stack}: rebuild it with "
                              f"`python -m deploy.bundle --stack {stack}`")


def _fill(tree, bucket: str):
    if isinstance(tree, dict):
        return {k: _fill(v, bucket) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fill(v, bucket) for v in tree]
    return tree.replace("YOUR-BUCKET", bucket) if isinstance(tree, str) else tree


def render_profile(profile: Path, bucket: str, out: Path) -> Path:
    """The jobs' profile with YOUR-BUCKET replaced by the bucket in its values, written for upload
    by a YAML serializer (a value can never become a key or a comment)."""
    tree = load_settings(profile)
    out.mkdir(parents=True, exist_ok=True)
    target = out / profile.name
    target.write_text(f"# {profile.name} with the bucket filled in by the launcher\n"
                      + yaml.safe_dump(_fill(tree, bucket), sort_keys=False))
    check_profile(target)
    return target



@dataclass(frozen=True)
class Upload:
    local: Path
    remote: str   # s3://... or gs://...


def weight_uploads(files: list[str], root: str) -> list[Upload]:
    """Staged weights files, each with its card beside it (python -m dl.weights stage), to
    <root>/weights/: how a cluster without internet gets pretrained weights; the profile names
    them (features.weights: s3://<bucket>/<prefix>/weights/<file>)."""
    from dl.weights import sidecar

    out = []
    for f in files:
        p, card = Path(f), Path(sidecar(f))
        if not p.is_file() or not card.is_file():
            raise DeployError(f"--weights {f}: needs the file and its card {card.name} beside it (stage them with "
                              "python -m dl.weights stage)")
        out += [Upload(p, f"{root}/weights/{p.name}"), Upload(card, f"{root}/weights/{card.name}")]
    return out


def uploads(base: str, bundle: Path, profile: Path, pipeline: list[Stage], extra: list[Path] = ()) -> list[Upload]:
    """What a run needs in the bucket under `base`: the packed environment, the jobs, the profile
    and the files stages read by path (training presets)."""
    items = [Upload(bundle, f"{base}/{bundle.name}"), Upload(profile, f"{base}/conf/{profile.name}")]
    for s in pipeline:
        items.append(Upload(ROOT / s.path, f"{base}/{s.path}"))
        items += [Upload(ROOT / f, f"{base}/{f}") for f in s.files]
    items += [Upload(p, f"{base}/deploy/{p.name}") for p in extra]
    seen, out = set(), []
    for u in items:
        if u.remote not in seen:
            seen.add(u.remote)
            out.append(u)
    return out


# ------------------------------------------------------------------------------------ per-stage Spark settings

def stage_conf(stage: Stage, gpu: dict | None, executors: int) -> dict[str, str]:
    """spark-submit --conf settings of one stage on a YARN cluster (EMR, Dataproc).

    gpu: None on CPU clusters, else {"per_node": GPUs per GPU node, "nodes": GPU nodes,
    "tasks_per_gpu": inference tasks sharing one GPU, "discovery": the discovery script}."""
    # the driver (cluster deploy mode: in a YARN container) and the executors run the archive's Python
    conf = {"spark.pyspark.python": PYTHON,
            # retried tasks (a lost node, a killed worker) instead of a failed stage
            "spark.task.maxFailures": "4"}
    if stage.needs == TRAIN:
        # TorchDistributor's barrier stage: Spark refuses it under dynamic allocation
        conf["spark.dynamicAllocation.enabled"] = "false"
        conf["spark.executor.instances"] = str(gpu["nodes"] * gpu["per_node"] if gpu else executors)
    if gpu and stage.needs in (TRAIN, GPU_INFER):
        conf["spark.executor.resource.gpu.amount"] = "1"
        conf["spark.executor.resource.gpu.discoveryScript"] = gpu["discovery"]
        # training takes a whole GPU per process (TorchDistributor reads an integer); inference shares one
        conf["spark.task.resource.gpu.amount"] = "1" if stage.needs == TRAIN else f"{1 / gpu['tasks_per_gpu']:g}"
    return conf


def stage_args(stage: Stage, profile_name: str, gpu: dict | None, executors: int) -> list[str]:
    """The job's own options on a cluster: the profile (shipped with --files into the working
    directory), presets by their file name (shipped the same way), training's cluster mode."""
    args = ["--config", profile_name]
    args += [Path(a).name if a in stage.files else a for a in stage.args]
    if stage.needs == TRAIN:
        processes = gpu["nodes"] * gpu["per_node"] if gpu else executors
        args += ["--set", "train.mode=cluster", "--set", f"train.processes={processes}"]
    return args


def add_arguments(ap, settings: Path, profile: Path, store: str) -> None:
    """The options both launchers take."""
    ap.add_argument("--settings", default=str(settings), help="cluster settings (YAML)")
    ap.add_argument("--config", default=str(profile), help="the jobs' profile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a cluster setting")
    ap.add_argument("--bucket", help=f"{store} bucket for the lake, uploads and logs (cluster.yaml's bucket)")
    ap.add_argument("--stages", help="comma-separated stage names (default: the whole cluster pipeline)")
    ap.add_argument("--bundle", help="the packed environment (default: make bundle's output for cluster.yaml's flavor)")
    ap.add_argument("--serverless", action="store_true", help=f"{store} serverless runs instead of a cluster")
    ap.add_argument("--weights", action="append", default=[], metavar="FILE",
                    help="a staged weights file (its card beside it: python -m dl.weights stage) to upload to "
                         "<bucket>/<prefix>/weights/, for clusters without internet (repeatable)")


def cluster_stages(only: list[str] | None) -> list[Stage]:
    try:
        return stages(CLUSTER, only)
    except ValueError as e:
        raise DeployError(str(e)) from None


def check_flavor(flavor: str, pipeline: list[Stage]) -> None:
    """The data bundle has no torch: refuse it for a pipeline with stages that import torch."""
    torch = [s.name for s in pipeline if s.torch]
    if flavor == "data" and torch:
        raise DeployError(f"the data bundle has no torch, which {', '.join(torch)} need: use the cpu or gpu bundle "
                          f"(cluster.yaml bundle), or --stages without them")


_NAMED_SECRET = re.compile(r'(?P<json>"[^"]*' + _SECRET_WORDS + r'[^"]*"\s*:\s*)"[^"]*"'
                           r'|(?P<kv>[^\s=]*' + _SECRET_WORDS + r'[^\s=]*=)\S+', re.I)


def redact(text: str) -> str:
    """What a launcher prints or logs, masked: key-shaped values (an error from a cloud API, a
    request), and the value of any JSON key or key=value setting that names a secret or credential
    anywhere in its path."""
    text = _SECRET_VALUE.sub("[redacted]", text)
    return _NAMED_SECRET.sub(lambda m: f'{m["json"]}"[redacted]"' if m["json"] else f'{m["kv"]}[redacted]', text)
