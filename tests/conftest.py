"""One real local Spark session and one moto S3 server for the whole test run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
JARS = ROOT / ".cache" / "jars"

# Credentials for the moto endpoint; set before Spark starts so its workers inherit them.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
})
# OpenMP threads (torch's intra-op pool) sleep when idle instead of spinning: make test runs two
# pytest workers, each with torch in its own process and its Spark workers, on two cores, where a
# spinning pool burns the CPU the other process waits for (two test_weights.py side by side: 39.7 s
# spinning, 26.3 s sleeping; alone 16.7 s and 17.3 s). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# glibc's malloc keeps freed blocks in the heap in every process started after this (make test's
# pytest-xdist workers, Spark's JVMs and Python workers, training ranks, jobs run as commands; not
# the pytest process that reads this file: without -n its own tests keep the defaults). With its
# defaults each large block (torch's activations, Arrow's buffers) is mapped on its own and unmapped
# when freed, and the next batch faults its pages in again: on the AMD EPYC 2-core VM a fresh page
# costs ~4.6 us, and test_weights.py spent 18-22 of its 61-70 core-s in the kernel (2026-12-07;
# with this in all its processes, as under pytest-xdist: 6-8 of 47-58; test_pretrained.py 308-329
# -> 248-254 core-s). The processes keep more memory (bench/malloc.py, docs/benchmarks.md: 18-35%
# for MobileNetV2 extraction; make test used at most 17.0 GB of 24), which the test machine has;
# users' processes keep glibc's defaults.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=268435456")
# Every Spark JVM the tests start (the session's, spark-submit children's, the spark35 lane's:
# spark-submit adds SPARK_SUBMIT_OPTS to the driver's java command) compiles with C1 only. Test
# JVMs run minutes on small data: C2's compiler threads took 25 of a session JVM's 53 core-s on
# test_pretrained.py alone (the file 133 -> 111 core-s with C1; test_prepare_dedup.py +
# test_reliability.py 212 -> 180); make test 1,806 -> 1,612 core-s. Results do not depend on the
# JIT tier; users' jobs keep the JVM's default (C2 pays off on real data).
# The serial collector and no code cache flushing, also for test JVMs only: on test_prepare_dedup.py
# G1's threads took 22 core-s (the serial collector's VM thread 8), the code cache sweeper 9, and
# the compiler threads 28 of which half recompiled what the sweeper had flushed (15 without
# flushing); the file 326 and 338 -> 278 and 285 core-s, test_explore.py 213 -> 189, make test's
# tests 2,464 and 2,604 -> 2,351 s (2026-12-07, AMD EPYC 2-core VM). A code cache of 512 MiB (one
# heap; 48 MiB of it used): in the default 240 MiB, cut in segments, the code cache sweeper still took
# 13.5-15.5 of the session JVM's 150-178 core-s on test_prepare_dedup.py (without flushing, with a
# sweeper threshold of 50%, without segments); with it none, the file 220 -> 208 core-s.
os.environ.setdefault("SPARK_SUBMIT_OPTS",
                      "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:-UseCodeCacheFlushing -XX:ReservedCodeCacheSize=512m")


def _java_without_the_vector_api() -> None:
    """Point JAVA_HOME (what spark-submit runs) at a bin/java that runs this machine's java without
    the `--add-modules=jdk.incubator.vector` Spark 4's launcher adds. With it, Spark ML's BLAS
    (dev.ludovic.netlib) takes its Vector API kernels, which only C2 turns into SIMD code: under
    C1 every lane operation runs as Java objects, and the L-BFGS of svm.engine=spark_ml spent
    three quarters of its executor samples in VectorBLAS.dgemv (JFR). Without the module the same
    library takes its plain Java loops: test_svm.py's two-engine test 310 core-s (C1, Vector API),
    238 (C2), 223 (C1, plain loops). Users' JVMs keep both (C2 compiles the Vector API)."""
    home = ROOT / ".cache" / "test-java"
    if os.environ.get("JAVA_HOME") == str(home):
        return  # a child of a test run (the spark35 lane) inherits it
    given = os.environ.get("JAVA_HOME")
    java = Path(given) / "bin" / "java" if given else shutil.which("java")
    if not java or not Path(java).is_file():
        return  # no Java there: the spark fixture fails with Spark's own message
    script = home / "bin" / "java"
    script.parent.mkdir(parents=True, exist_ok=True)
    text = ("#!/bin/bash\n# tests/conftest.py: Spark's java command without the incubating Vector API\n"
            "args=()\nfor a in \"$@\"; do [ \"$a\" = --add-modules=jdk.incubator.vector ] || args+=(\"$a\"); done\n"
            f"exec '{Path(java).resolve()}' \"${{args[@]}}\"\n")
    if not script.exists() or script.read_text() != text:
        tmp = script.with_name(f"java.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, script)  # pytest-xdist's workers and the lane write it at once
    os.environ["JAVA_HOME"] = str(home)


_java_without_the_vector_api()

# Spark binds to the loopback, where nearly all of a test run's connections are, and barrier-mode
# TorchDistributor checks its rendezvous port by binding the executor's address with port 0, then
# torchrun listens on that port on every address. On the machine's other address (Spark's default
# here) the check passed ports that loopback connections held, and torchrun failed with EADDRINUSE.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range. Whatever gets it binds it a
    moment (a server) or seconds (torch's rendezvous, in spawned ranks) after this probe; a port
    of the ephemeral range (what binding port 0 gives) may meanwhile become the source port of
    another process's outgoing connection (EADDRINUSE), one below it never does."""
    import random

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    pick = random.SystemRandom()  # not the global generator, which a test may have seeded
    for _ in range(1000):
        port = pick.randrange(max(1024, low - 10000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} after 1000 tries")


LANE = "spark35_lane.py"  # make test's Spark 3.5 lane, one long test (tests/spark35_lane.py)
# Seconds each file took in make test's pytest-xdist run on the 2-core machine (2026-12-06), for the
# order the files are handed out in: longest first, so that the run ends on short files. Handed out
# by number of tests instead, two-test test_svm.py and one-test test_determinism.py came last: the
# run's last 100 s had one worker left (861 s; the other worker was done at 762 s). A file not
# listed counts as a minute. The order changes no result.
FILE_SECONDS = {
    "test_train": 185, "test_svm": 118, "test_failures": 114, "test_reliability": 87, "test_pretrained": 86,
    "test_deploy": 85, "test_s3": 74, "test_prepare_dedup": 72, "test_explore": 68, "test_score": 54,
    "test_likability": 52, "test_fetch": 49, "test_text_retrieval": 43, "test_determinism": 43,
    "test_spark_submit": 22, "test_ingest": 22, "test_followers": 16, "test_weights": 14, "test_data": 10,
    "test_sample": 9, "test_archive": 8, "test_progress": 4, "test_models": 4, "test_images": 4,
    "test_faces": 4, "test_distributed": 4, "test_layout": 3, "test_config": 3, "test_checkpoint": 2,
    "test_storage_and_lake": 0,
}


def pytest_collection_modifyitems(config, items):
    """With the spark35 lane collected (make test, under --no-loadscope-reorder): the lane first,
    so that a pytest-xdist worker starts it at once and the other fills both cores around it, then
    the files longest first (FILE_SECONDS)."""
    if any(i.path.name == LANE for i in items):
        items.sort(key=lambda i: (i.path.name != LANE, -FILE_SECONDS.get(i.path.stem, 60)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A minute before pytest-timeout would fail a test (fixtures included), print every Python
    thread's stack and the Spark driver JVM's threads (jcmd Thread.print), then cancel the running
    Spark jobs. A test blocked in a Spark call waits in a socket read that pytest-timeout's signal
    may not interrupt (the signal can land on another thread); cancelled, the call raises and the
    run goes on instead of hanging until CI's limit."""
    import faulthandler
    import subprocess
    import threading

    marked = item.get_closest_marker("timeout")
    limit = float(marked.kwargs.get("timeout", marked.args[0] if marked.args else 0) if marked
                  else item.config.getini("timeout") or 0)  # @pytest.mark.timeout(N) or (timeout=N)

    def rescue():
        from pyspark import SparkContext

        print(f"+++ {item.nodeid} still running after {limit - 60:.0f} s +++", file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        sc = SparkContext._active_spark_context
        proc = getattr(getattr(sc, "_gateway", None), "proc", None)
        if proc is not None:
            out = subprocess.run(["jcmd", str(proc.pid), "Thread.print"], capture_output=True, text=True, timeout=60)
            print("+++ Spark driver JVM threads +++\n" + out.stdout + out.stderr, file=sys.__stderr__, flush=True)
            sc.cancelAllJobs()

    timer = threading.Timer(limit - 60, rescue) if limit > 120 else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer:
            timer.cancel()


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_sets(moto_endpoint) -> list[str]:
    """--set options that point a job at the moto server."""
    return ["--set", f"s3.endpoint={moto_endpoint}", "--set", "s3.path_style_access=true"]


def _spark_jars_first() -> list[str]:
    """Spark's own jars and Scala's, for the front of the session JVM's class path. The JVM looks a
    class file up jar by jar in class path order, and Spark's jars/* comes in directory order
    (spark-core 72nd of 279 jars here, spark-mllib 197th): Spark's ClosureCleaner reads the class
    file of every closure it cleans, once per RDD operation, and with Spark ML's per-iteration jobs
    that search took 13% of the session JVM's samples in test_failures.py's SVM test (JFR), 9% with
    these jars first (lookups of classes that no jar holds still search them all): the test 185 ->
    175 core-s."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    names = ("spark-core_", "spark-sql_", "spark-catalyst_", "spark-mllib_", "spark-sql-api_", "spark-common-utils_",
             "scala-library-")
    return [str(j) for name in names for j in sorted(jars.glob(f"{name}*.jar"))]


@pytest.fixture(scope="session")
def spark(moto_endpoint, tmp_path_factory):
    from core.config import load_config
    from core.jars import jar_paths
    from core.session import get_session

    jars = jar_paths(JARS)
    missing = [str(j) for j in jars if not j.exists()]
    assert not missing, f"s3a jars missing: {missing}; run `make jars`"
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"lake={tmp_path_factory.mktemp('lake')}",
        "spark.master=local[2, 4]", "spark.driver.memory=3g", "spark.sql.shuffle.partitions=4",
        # One session runs a whole file's queries: Spark's cache of generated code (100 classes by
        # default) evicted and recompiled them (test_prepare_dedup.py: 1,256 Janino compiles, 14 s;
        # 428 and 7 s with 2,000 entries, CodegenMetrics).
        "spark.sql.codegen.cache.maxEntries=2000",
        f"spark.jars={','.join(str(j) for j in jars)}",
        f"spark.driver.extraClassPath={':'.join(_spark_jars_first())}",
        f"s3.endpoint={moto_endpoint}", "s3.path_style_access=true",
    ])
    session = get_session(cfg, app_name="tests")
    yield session
    session.stop()


@contextlib.contextmanager
def file_lock(path: str | Path):
    """Held by one process at a time (an exclusive flock on path, released when the block ends)."""
    import fcntl

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def module_folder(request, tmp_path_factory, name: str):
    """A new folder for a module fixture's outputs, removed once the module's tests are done if none
    of them failed, as pyproject.toml's tmp_path_retention_policy = "failed" removes a passed test's
    tmp_path: the training lakes hold checkpoints of 0.7 GB each, and a whole run kept every one
    (9.2 GB under /tmp at its end; a CI machine ran out of disk)."""
    failed = request.session.testsfailed
    folder = tmp_path_factory.mktemp(name)
    yield folder
    if request.session.testsfailed == failed:
        shutil.rmtree(folder, ignore_errors=True)


def machine_lock(name: str):
    """Held by one test process of this machine at a time (make test runs the spark35 lane beside
    the spark4 suite: the same test may run in both at once)."""
    import tempfile

    return file_lock(Path(tempfile.gettempdir()) / f"instalearn-tests-{name}.lock")


def built_once(tmp_path_factory, name: str, build):
    """What build(folder) writes into a new folder and returns, made once per test run: under
    pytest-xdist the first worker to ask builds it in the run's shared temp folder (the others wait
    on a file lock) and every worker reads it there; the returned value travels as a pickle."""
    import pickle
    import shutil

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name
    with file_lock(f"{folder}.lock"):
        done = folder.with_suffix(".pickle")
        if not done.exists():  # (a worker whose build failed leaves no pickle: the next one starts anew)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_bytes(pickle.dumps(build(folder)))
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """A generated sample (150 city posts + planted mess + 80 '#me' posts) shared by the tests,
    read only (one copy for both pytest-xdist workers)."""
    from core.config import Sample
    from sparkml.sample.make_sample import generate

    def build(folder: Path):
        out = folder / "s"
        return out, generate(Sample(out=str(out), posts=150, seed=11, size=320, me_posts=80, workers=2))

    return built_once(tmp_path_factory, "sample", build)


@pytest.fixture(scope="session")
def prepared(spark, sample, tmp_path_factory):
    """The sample (manifest layout) through ingest, prepare_images and dedup, for the tests of
    those stages and of the stages that build on them: built once per run, each pytest-xdist
    worker gets its own copy (module fixtures add their stages' outputs to it)."""
    import shutil

    from core.lake import Lake
    from sparkml.sample.make_sample import MANIFEST

    root, truth = sample

    def build(lake: Path) -> str:
        common = ["--set", f"lake={lake}", "--set", f"source.path={root / MANIFEST}", "--set", "source.layout=manifest"]
        for job in ("ingest", "prepare_images", "dedup"):
            assert run_job(job, *common) == 0, job
        return str(lake)

    built = built_once(tmp_path_factory, "lake_built", build)
    lake = tmp_path_factory.mktemp("lake_prep")
    shutil.copytree(built, lake, dirs_exist_ok=True)
    return Lake(str(lake)), truth


WEIGHTS: dict[str, str] = {}  # model -> URI of the shipped ImageNet weights staged for this session


@pytest.fixture(scope="session", autouse=True)
def weights(tmp_path_factory) -> dict[str, str]:
    """The real ImageNet weights of ../shared/data/weights (MobileNetV2, SqueezeNet 1.0) staged
    with their cards once per session, as jobs/stage_weights.py stages them for the demo; run_job
    points the profile's features and explore weights (the demo's ./data/weights path) at them."""
    from dl.weights import stage

    out = tmp_path_factory.mktemp("weights")
    for model in ("mobilenet_v2", "squeezenet1_0"):
        src = SHARED / "data" / "weights" / f"{model}_imagenet.pth"
        assert src.is_file(), f"{src} is missing: ../shared/data/weights must be beside the repository"
        WEIGHTS[model], _ = stage(str(src), str(out), name=model)
    return dict(WEIGHTS)


def load_job(name: str):
    """Import jobs/<name>.py as a module (jobs/ is not a package: spark-submit runs the files)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(name: str, *args: str) -> int:
    """jobs/<name>.py with conf/local.yaml, its weights (the demo's staged MobileNetV2) at this
    session's staged copy; the test's own --set options come after and win."""
    staged = ["--set", f"features.weights={WEIGHTS['mobilenet_v2']}", "--set",
              f"explore.weights={WEIGHTS['mobilenet_v2']}"] if WEIGHTS else []  # a subprocess of a test: none staged
    return load_job(name).main(["--config", str(ROOT / "conf" / "local.yaml"), *staged, *args])


def ingest(lake, source, layout: str = "manifest", *sets: str) -> int:
    """jobs/ingest.py of `source` in `layout` into `lake`, with further `key=value` settings."""
    return run_job("ingest", *[a for kv in (f"lake={lake}", f"source.path={source}", f"source.layout={layout}", *sets)
                               for a in ("--set", kv)])


def planted(truth: dict, kind: str, layout: str = "instacities") -> list[dict]:
    return [c for c in truth["planted"] if c["kind"] == kind and layout in c.get("layouts", [layout])]


def rejects_by_reason(spark, lake, stage: str) -> dict[str, set[str]]:
    """The stage's rejected table as reason -> post_ids."""
    rows = spark.read.parquet(lake.rejected(stage)).select("reason", "post_id").collect()
    out: dict[str, set[str]] = {}
    for r in rows:  # a missing post_id stays None (pandas 3's string dtype would make it NaN)
        out.setdefault(r.reason, set()).add(r.post_id)
    return out


def make_export(root: Path, photos: list[Path], nested: bool = False) -> dict:
    """An Instagram export of the given photos (sparkml.sample.write_export: carousels, a video,
    a missing media file, mojibake captions); returns its ground truth."""
    from sparkml.sample.make_sample import write_export

    return write_export(root, [(p.stem.replace("-", "_"), p.read_bytes()) for p in photos], nested=nested)


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    found = sorted((SHARED / "data" / "photos").glob("*.jpg"))
    assert len(found) == 396, f"../shared/data/photos should hold 396 photos, found {len(found)}"
    return found


def open_in_chromium(page: Path, screenshot: Path) -> dict:
    """Open a local HTML file in headless Chromium (Debian's chromium + chromium-driver, which
    .ci/run installs): every <img> with its naturalWidth, the console's errors, and a
    full-page screenshot saved at `screenshot`."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    assert driver_path and browser, "headless Chromium is missing: apt-get install chromium chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900",
              "--allow-file-access-from-files"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1300, min(int(height) + 100, 16000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        title = driver.title
    finally:
        driver.quit()
    return {"images": images, "errors": errors, "title": title}
