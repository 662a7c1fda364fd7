import subprocess
import sys

import pytest

from core.config import ConfigError, describe_keys, load_config, parse_override
from tests.conftest import ROOT

LOCAL = ROOT / "conf" / "local.yaml"


def test_profiles_load_and_validate():
    for name in ("local", "emr", "dataproc"):
        cfg = load_config(ROOT / "conf" / f"{name}.yaml")
        assert cfg.lake and cfg.source.path and cfg.source.layout in ("instacities", "manifest")
    local = load_config(LOCAL)
    assert local.spark_conf()["spark.master"] == "local[*, 4]"
    assert local.spark_conf()["spark.ui.enabled"] == "false"


def test_overrides_are_typed_and_spark_keys_keep_their_dots():
    cfg = load_config(LOCAL, ["ingest.read_threads=3", "spark.sql.shuffle.partitions=5",
                              "source.layout=instacities", "s3.path_style_access=true"])
    assert cfg.ingest.read_threads == 3
    assert cfg.spark_conf()["spark.sql.shuffle.partitions"] == "5"
    assert cfg.source.layout == "instacities"
    assert cfg.s3.path_style_access is True


@pytest.mark.parametrize("override, message", [
    ("ingest.tpyo=1", "unknown config key 'ingest.tpyo'"),
    ("lakee=/tmp/x", "unknown config key 'lakee'"),
    ("ingest.read_threads=many", "config key 'ingest.read_threads'"),
    ("source.layout=folders", "config key 'source.layout'"),
    ("score.layout=zip", "config key 'score.layout'"),
    ("explore.k=1", "config key 'explore.k'"),
    ("lake.sub=1", "lake is not a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lake: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("lake: /tmp/l\n")
    with pytest.raises(ConfigError, match="missing config key 'source'"):
        load_config(partial)


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("s=local[*]") == ("s", "local[*]")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_help_lists_every_key():
    lines = "\n".join(describe_keys())
    for key in ("lake", "source.path", "source.layout", "spark", "s3.endpoint", "ingest.read_threads", "sample.seed"):
        assert f"  {key}  " in lines


def _job(*args):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_job_help_and_bad_options_exit_2_with_one_line():
    ok = _job("--help")
    assert ok.returncode == 0
    assert "--set KEY=VALUE" in ok.stdout and "source.layout" in ok.stdout
    typo = _job("--set", "ingest.tpyo=3")
    assert typo.returncode == 2
    assert typo.stderr.strip() == "ingest.py: error: unknown config key 'ingest.tpyo'"
    unknown = _job("--frobnicate")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    missing = _job("--config", "conf/nope.yaml")
    assert missing.returncode == 2 and "config file not found" in missing.stderr


JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS)
def test_every_job_refuses_an_unknown_config_key_in_one_line(job, capsys):
    from tests.conftest import load_job

    extra = {"retrieve": ["--query", "x"], "train_cnn": ["--task", "city"]}.get(job, [])
    with pytest.raises(SystemExit) as stop:
        load_job(job).main(["--config", str(LOCAL), "--set", "dedup.max_hammin=3", *extra])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == f"{job}.py: error: unknown config key 'dedup.max_hammin'"
