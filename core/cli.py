"""The shared command line and run of every job: --config, --set, --help (exit 2 with one line
on a bad option or config); then the session, the stage's body, and its summary (written by
core.lake.close_output, or _FAILED.json when the counts do not balance: exit 1); a missing or
stale input or a refused setting is one line and exit 2; the outputs' locks are released at the end.

A job file is a few lines:

    def body(spark, cfg, args) -> Summary: ...
    if __name__ == "__main__":
        sys.exit(cli.run("ingest", __doc__, body))
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

from core import storage
from core import lake
from core.config import Config, ConfigError, describe_keys, load_config
from core.lake import FAILED_FILE, SUMMARY_FILE, IncompleteInput, Summary, close_output

log = logging.getLogger("instalearn")

Body = Callable[..., Summary]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(stage: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{stage}.py",
        description=(doc or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the profile or with --set key=value):\n" + "\n".join(describe_keys()),
    )
    p.add_argument("--config", default="conf/local.yaml",
                   help="YAML profile: conf/local.yaml (default), conf/emr.yaml, conf/dataproc.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lake=s3://bucket/run1 (repeatable)")
    if add_arguments:
        add_arguments(p)
    return p


def parse(stage: str, doc: str, argv: list[str] | None = None,
          add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
          base: Callable[[argparse.Namespace], dict] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config (over the sections base(args) gives, e.g. a
    preset the options name); exits 2 with one line on any problem."""
    p = parser(stage, doc, add_arguments)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, base(args) if base else None)
    except ConfigError as e:
        p.error(str(e))
    return cfg, args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("py4j", "pyspark", "gensim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("gensim.models.ldamodel").setLevel(logging.INFO)  # LDA training progress


def _first_line(e: Exception) -> str:
    """The meaningful line of a (possibly Java) exception."""
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("at ", "Traceback", "py4j", "An error occurred")):
            return line[:300]
    return type(e).__name__


def run(stage: str, doc: str, body: Body, argv: list[str] | None = None,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        base: Callable[[argparse.Namespace], dict] | None = None) -> int:
    """Parse, build the session, run the stage, write its _SUMMARY.json, log one line."""
    cfg, args = parse(stage, doc, argv, add_arguments, base)
    setup_logging()
    from core import progress
    from core.session import get_session  # pyspark import only once the options are good

    try:
        storage.check_writable(cfg.lake)
        storage.check_reachable([cfg.lake, cfg.source.path], cfg.s3.endpoint, cfg.s3.region)
    except ConfigError as e:
        print(f"{stage}.py: error: {e}", file=sys.stderr)
        return 2
    try:
        spark = get_session(cfg, app_name=stage)
    except ConfigError as e:
        print(f"{stage}.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the JVM refused a setting: one line, not its trace
        print(f"{stage}.py: error: Spark did not start with these settings (the spark: section and --set "
              f"spark.*): {_first_line(e)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    lake.start_run()
    try:  # the outputs' locks are held until the summary is written
        with progress.Progress(spark, stage, progress.interval(cfg.progress.interval)):
            summary = body(spark, cfg, args)
        summary.seconds = round(time.perf_counter() - t0, 3)
        log.info(summary.line())
        print(summary.line())
        if not summary.balanced:
            # no _SUMMARY.json: the output must not look complete to the stages after this one
            close_output(spark, summary, FAILED_FILE)
            log.error("%s: input != output + rejected + duplicates: records were lost; this is a bug. The output "
                      "has no %s (the counts are in %s/%s)", stage, SUMMARY_FILE, summary.output, FAILED_FILE)
            return 1
        # who made this output from what: readers refuse it once one of its inputs is rewritten
        close_output(spark, summary)
        return 0
    except (ConfigError, IncompleteInput) as e:
        print(f"{stage}.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        lake.release_locks()
