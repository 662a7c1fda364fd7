"""URL ingest (sparkml.ingest.fetch): image URLs in a manifest fetched on executors against a real
HTTP server on 127.0.0.1 that serves good JPEGs and every fault ingest must survive."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import Http
from sparkml.ingest import fetch
from tests.conftest import ROOT, ingest, rejects_by_reason
from tests.http_server import FaultServer

FAST = dict(allow_private=True, read_timeout=1.0, timeout=2.0, backoff=0.05, max_bytes=1_000_000, retries=3)


@pytest.fixture(scope="module")
def served(photos):
    files = {p.name: p.read_bytes() for p in photos[:40]}
    server = FaultServer(files).start()
    yield server, files
    server.stop()


def _fetch(urls: list[str], cache: Path, **opts) -> list[dict]:
    import pyarrow as pa

    batch = pa.RecordBatch.from_pydict({"image": urls})
    out = list(fetch.fetch_batches(iter([batch]), "image", Http(**{**FAST, **opts}), f"file://{cache}"))
    rows = pa.Table.from_batches(out).to_pylist()
    return sorted(rows, key=lambda r: urls.index(r["image"]))


def faults(base: str, names: list[str], tag: str) -> dict[str, str | None]:
    """URL -> the reason it must end with (None: fetched); the ground truth of the fault tests.
    The server counts requests per key: `tag` keeps each test's keys its own."""
    return {
        f"{base}/img/{names[0]}": None,
        f"{base}/redirect/{names[1]}": None,
        f"{base}/flaky/2/{tag}-{names[2]}/{names[2]}": None,           # 503 twice, then the image
        f"{base}/retry-after/1/{tag}-{names[3]}/{names[3]}": None,     # 429 + Retry-After: 1, then the image
        f"{base}/reset/1/{tag}-{names[4]}/{names[4]}": None,           # one reset, then the image
        f"{base}/status/404/a": "http_status",
        f"{base}/status/403/b": "http_status",
        f"{base}/img/not-there.jpg": "http_status",
        f"{base}/slow/5/{names[5]}": "timeout",
        f"{base}/flaky/99/{tag}-always/{names[6]}": "http_status",     # 503 every time: retries end
        f"{base}/reset/99/{tag}-always/{names[7]}": "connection_error",
        f"{base}/loop/0": "too_many_redirects",
        f"{base}/big/2000000": "too_large",                        # Content-Length over max_bytes
        f"{base}/stream/2000000": "too_large",                     # no length: stopped mid-stream
        f"{base}/html/page": "not_an_image",
        "http://127.0.0.1:1/img/x.jpg": "connection_error",        # nothing listens on port 1
    }


def test_every_fault_ends_with_its_reason(served, tmp_path):
    server, files = served
    names = sorted(files)
    truth = faults(server.url, names, "unit")
    t0 = time.perf_counter()
    rows = _fetch(list(truth), tmp_path / "cache")
    assert time.perf_counter() - t0 < 30
    got = {r["image"]: r["_reason"] for r in rows}
    assert got == truth
    by_url = {r["image"]: r for r in rows}
    assert by_url[f"{server.url}/flaky/2/unit-{names[2]}/{names[2]}"]["_retries"] == 2
    assert by_url[f"{server.url}/flaky/99/unit-always/{names[6]}"]["_requests"] == 4  # 1 + retries=3, no more
    assert by_url[f"{server.url}/status/404/a"]["_detail"].startswith("404")
    assert by_url[f"{server.url}/status/404/a"]["_requests"] == 1  # a 404 is not retried
    for url, reason in truth.items():
        if reason is None:  # the bytes in the cache are the served file's
            name = url.rsplit("/", 1)[1]
            assert Path(by_url[url]["read_uri"][len("file://"):]).read_bytes() == files[name]


def test_retry_after_is_honoured(served, tmp_path):
    server, files = served
    name = sorted(files)[8]
    t0 = time.perf_counter()
    [row] = _fetch([f"{server.url}/retry-after/2/k-honour/{name}"], tmp_path / "c")
    assert row["_reason"] is None and row["_retries"] == 1
    assert time.perf_counter() - t0 >= 2.0  # waited as told, not the 0.05 s backoff
    # a Retry-After past max_retry_after ends the retries at once
    [row] = _fetch([f"{server.url}/retry-after/60/k-long/{name}"], tmp_path / "d", max_retry_after=5)
    assert row["_reason"] == "http_status" and "Retry-After" in row["_detail"] and row["_requests"] == 1


def test_private_addresses_are_refused_unless_allowed(served, tmp_path):
    server, files = served
    name = sorted(files)[9]
    before = sum(server.hits.values())
    urls = [f"{server.url}/img/{name}", f"http://localhost:{server.server_address[1]}/img/{name}",
            "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.jpg", "http://[::1]/x.jpg"]
    rows = _fetch(urls, tmp_path / "c", allow_private=False)
    assert [r["_reason"] for r in rows] == ["private_address"] * len(urls)
    assert "localhost" in rows[1]["_detail"]  # refused where the name resolved
    assert sum(server.hits.values()) == before  # not one request reached the server
    assert asyncio.run(_resolves_private()) == "refused"


async def _resolves_private() -> str:
    r = fetch.GuardedResolver(allow_private=False)
    try:
        await r.resolve("localhost", 80)
        return "resolved"
    except fetch.PrivateAddress:
        return "refused"
    finally:
        await r.close()


def test_no_credentials_and_the_configured_agent(served, tmp_path):
    server, files = served
    name = sorted(files)[10]
    host = server.url.split("://", 1)[1]
    [row] = _fetch([f"http://user:secret@{host}/img/{name}"], tmp_path / "c", user_agent="probe-agent/1")
    assert row["_reason"] is None
    assert server.credentials_seen == 0 and "probe-agent/1" in server.agents


def _holder(folder: str, key: str, n: int, hold: float, times: int, active, peak, lock) -> None:
    async def one(slots):
        for _ in range(times):
            async with slots.hold(key, n):
                with lock:
                    active.value += 1
                    peak.value = max(peak.value, active.value)
                await asyncio.sleep(hold)
                with lock:
                    active.value -= 1

    async def main():
        slots = fetch.Slots(folder)
        await asyncio.gather(*[one(slots) for _ in range(4)])

    asyncio.run(main())


def test_slots_bound_holders_across_processes(tmp_path):
    """The per-host and per-executor limits hold across an executor's Python workers (one
    process per task): 3 processes x 4 coroutines want a key with 3 slots."""
    ctx = mp.get_context("spawn")
    active, peak, lock = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Lock()
    procs = [ctx.Process(target=_holder, args=(str(tmp_path), "example.com", 3, 0.02, 10, active, peak, lock))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert peak.value == 3  # reached, never passed


# ---------------------------------------------------------------- through the ingest job


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ingest(lake: Path, manifest: Path, *sets: str) -> int:
    return ingest(lake, manifest, "manifest", *[f"ingest.http.{k}={v}" for k, v in FAST.items()], *sets)


@pytest.mark.slow
def test_manifest_of_urls_every_url_accounted_and_resumed(spark, served, tmp_path, photos):
    from core.lake import Lake, read_summary

    server, files = served
    names = sorted(files)
    truth = faults(server.url, names, "job")
    rows = [{"post_id": f"u{i}", "image": url, "caption": f"post {i}"} for i, url in enumerate(truth)]
    rows += [{"post_id": "local1", "image": str(photos[0])},                       # a path beside the URLs
             {"post_id": "u0", "image": f"{server.url}/img/{names[11]}"},          # duplicate post_id
             {"post_id": "ftp1", "image": "ftp://example.com/a.jpg"}]              # no such scheme here
    manifest = _manifest(tmp_path / "urls.jsonl", rows)
    lake = Lake(str(tmp_path / "lake"))
    assert _ingest(tmp_path / "lake", manifest) == 0

    ids = {f"u{i}": r for i, r in enumerate(truth.values())}
    posts = {r["post_id"]: r for r in spark.read.parquet(lake.table("posts")).collect()}
    assert set(posts) == {p for p, r in ids.items() if r is None} | {"local1"}
    for i, url in enumerate(truth):
        if truth[url] is None:
            assert posts[f"u{i}"]["image_uri"] == url  # the URL is kept, not the cache path
            assert posts[f"u{i}"]["image_bytes"] == files[url.rsplit("/", 1)[1]]
    expected = {}
    for p, r in ids.items():
        if r is not None:
            expected.setdefault(r, set()).add(p)
    expected["duplicate_post"] = {"u0"}
    expected["bad_manifest_row"] = {"ftp1"}
    assert rejects_by_reason(spark, lake, "ingest") == expected
    s = read_summary(spark, lake.table("posts"))
    assert s["balanced"] and s["input_rows"] == len(rows)
    http = s["http"]
    # the duplicate post's URL is fetched too: which row of a post_id is kept depends on its image
    assert http["urls"] == len(truth) + 1 and http["skipped"] == 0 and http["ok"] == 5 + 1
    # flaky 2 + Retry-After 1 + three URLs that fail every time 3 each (+ 1 if aiohttp did not
    # itself resend the reset request on a fresh connection)
    assert http["retries"] in (12, 13) and http["requests"] >= len(truth) and http["requests_per_s"] > 0

    # a re-run asks again only for what failed for now (timeout, connection errors, 5xx)
    hits = dict(server.hits)
    assert _ingest(tmp_path / "lake", manifest) == 0
    s2 = read_summary(spark, lake.table("posts"))
    transient = {u for u, r in truth.items() if r in ("timeout", "connection_error")} | {
        f"{server.url}/flaky/99/job-always/{names[6]}"}
    assert s2["http"]["skipped"] == len(truth) + 1 - len(transient)
    asked_again = {k for k, v in server.hits.items() if v > hits.get(k, 0)}
    assert {server.url + k for k in asked_again} <= transient
    assert {r["post_id"] for r in spark.read.parquet(lake.table("posts")).select("post_id").collect()} == set(posts)
    assert rejects_by_reason(spark, lake, "ingest") == expected


def test_a_thousand_urls_keep_open_files_bounded(spark, served, tmp_path):
    server, files = served
    names = sorted(files)
    rows = [{"post_id": str(i), "image": f"{server.url}/img/{names[i % len(names)]}?n={i}"} for i in range(1000)]
    manifest = _manifest(tmp_path / "many.jsonl", rows)
    from core.lake import Lake, read_summary

    lake = Lake(str(tmp_path / "lake"))
    assert _ingest(tmp_path / "lake", manifest, "ingest.http.concurrency=32", "ingest.http.per_host=16") == 0
    s = read_summary(spark, lake.table("posts"))
    assert s["output_rows"] == 1000 and s["http"]["ok"] == 1000
    # a Python worker opens ~60 files of its own; one leaked descriptor per URL would be 1,000 more
    assert s["http"]["peak_open_files"] <= 60 + 32 + 2 * 16 + 40, s["http"]


@pytest.mark.slow
def test_killed_mid_fetch_resumes_without_refetching(spark, photos, tmp_path):
    from core.lake import Lake, read_summary

    files = {p.name: p.read_bytes() for p in photos[:50]}
    server = FaultServer(files, latency=0.05).start()
    try:
        names = sorted(files)
        rows = [{"post_id": str(i), "image": f"{server.url}/img/{names[i % 50]}?k={i}"} for i in range(3000)]
        manifest = _manifest(tmp_path / "resume.jsonl", rows)
        lake = Lake(str(tmp_path / "lake"))
        sets = [f"lake={tmp_path / 'lake'}", f"source.path={manifest}", "source.layout=manifest",
                "ingest.http.allow_private=true", "ingest.http.concurrency=8", "spark.master=local[1]"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "ingest.py"), "--config",
                                str(ROOT / "conf" / "local.yaml"), *[a for s in sets for a in ("--set", s)]],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = tmp_path / "lake" / "cache" / "http"
        deadline = time.time() + 180
        while time.time() < deadline and job.poll() is None:
            if cache.exists() and sum(1 for _ in cache.rglob("*") if _.is_file()) >= 300:
                break
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
        for _ in range(100):  # until every process of the job (JVM, Python workers) is gone
            try:
                os.killpg(job.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        done = sum(1 for f in cache.rglob("*") if f.is_file() and not f.name.startswith("."))
        assert 300 <= done < 3000
        assert not (Path(lake.table("posts")) / "_SUMMARY.json").exists()
        hits_before = dict(server.hits)
        assert _ingest(tmp_path / "lake", manifest, "ingest.http.concurrency=64") == 0
        s = read_summary(spark, lake.table("posts"))
        assert s["output_rows"] == 3000 and s["http"]["skipped"] == done
        refetched = [k for k, v in server.hits.items() if k in hits_before and v > hits_before[k]]
        # only what was in flight when the job died (not yet in the cache) is asked for twice
        assert len(refetched) <= 3000 - done and s["http"]["requests"] == 3000 - done
    finally:
        server.stop()
