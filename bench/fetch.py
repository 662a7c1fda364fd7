"""URL ingest benchmark (issue 19): image URLs per second on one core against a local HTTP
server that adds `--latency` seconds to every answer (a remote CDN's round trip).

Rows, all in one run over the same URLs (real JPEGs from ../shared/data/photos, each URL
unique so nothing is served from a cache):
- baseline: a plain sequential loop of urllib.request.urlopen(url).read(), the likability
  study's first way (about one latency per image);
- urllib3 threads: urllib3's PoolManager under a thread pool of the same concurrency, the
  other client we considered (why aiohttp was chosen);
- ours: sparkml.ingest.fetch.fetch_batches, what ingest runs in each task (aiohttp, the executor-wide
  slots, the cache writes into a temporary lake), at the default ingest.http settings;
  peak open file descriptors of the process reported.
Each row is the median of --repeat runs, after a warm-up run. Each is measured over one host and over `--hosts` loopback addresses (127.0.0.1..N, distinct
hosts to the per-host limit, like a CDN's edge names). The client is pinned to the first core
and the server to the last.

    .venv/bin/python bench/fetch.py [--latency 0.1] [--urls 3000] [--hosts 8] [--baseline-urls 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from _common import ROOT, header

PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def urls_for(bases: list[str], files: list[str], n: int, tag: str) -> list[str]:
    return [f"{bases[i % len(bases)]}/img/{quote(files[i % len(files)])}?{tag}={i}" for i in range(n)]


def timed(fn, *args):
    """(result, URLs/s, client CPU ms per URL) of fn(urls, ...)."""
    urls = args[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, len(urls) / wall, cpu * 1000 / len(urls)


def baseline(urls: list[str]) -> None:
    for u in urls:
        with urllib.request.urlopen(u, timeout=30) as r:
            r.read()


def urllib3_threads(urls: list[str], concurrency: int, per_host: int) -> None:
    import urllib3

    pool = urllib3.PoolManager(maxsize=per_host, block=True, num_pools=64)
    try:
        with ThreadPoolExecutor(concurrency) as ex:
            for r in ex.map(lambda u: pool.request("GET", u, timeout=30).data, urls):
                assert r
    finally:
        pool.clear()  # close its connections, as ours closes its session


def ours(urls: list[str], batch_rows: int, lake: str) -> int:
    from core.config import Http
    from sparkml.ingest import fetch

    opts = Http(allow_private=True)  # the defaults, but the server is on loopback
    batches = [pa.RecordBatch.from_pydict({"image": urls[i:i + batch_rows]}) for i in range(0, len(urls), batch_rows)]
    out = list(fetch.fetch_batches(iter(batches), "image", opts, f"file://{lake}/cache/http"))
    table = pa.Table.from_batches(out)
    failed = [d for d in table.column("_detail").to_pylist() if d]
    assert not failed, failed[:5]
    return max(table.column("_open_files").to_pylist())


def job(info: dict, a, base: float) -> None:
    """jobs/ingest.py on local[1] (this process's one core) over a manifest of URLs on all hosts:
    the fetch phase's URLs/s from its summary, and the whole job's wall time."""
    import importlib.util

    work = Path(tempfile.mkdtemp(prefix="bench-fetch-job-"))
    try:
        urls = urls_for(info["urls"][:a.hosts], info["files"], a.spark, "job")
        manifest = work / "urls.jsonl"
        manifest.write_text("".join(json.dumps({"post_id": str(i), "image": u}) + "\n" for i, u in enumerate(urls)))
        spec = importlib.util.spec_from_file_location("ingest_job", ROOT / "jobs" / "ingest.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sets = [f"lake={work / 'lake'}", f"source.path={manifest}", "source.layout=manifest",
                "ingest.http.allow_private=true", "spark.master=local[1]", "spark.driver.memory=2g"]
        t0 = time.perf_counter()
        rc = mod.main(["--config", str(ROOT / "conf" / "local.yaml"), *[x for s in sets for x in ("--set", s)]])
        wall = time.perf_counter() - t0
        summary = json.loads((work / "lake" / "tables" / "posts" / "_SUMMARY.json").read_text())
        http = summary["http"]
        print(f"\njobs/ingest.py, local[1], {len(urls)} URLs on {a.hosts} hosts: rc={rc}, "
              f"fetch {http['urls'] / http['seconds']:.0f} URLs/s ({http['urls'] / http['seconds'] / base:.1f}x the "
              f"baseline), {http['requests']} requests, peak open fds {http['peak_open_files']}; whole job {wall:.1f} s "
              f"(Spark start, fetch, then the posts table written from the cache)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--urls", type=int, default=3000)
    ap.add_argument("--baseline-urls", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row: the median is printed")
    ap.add_argument("--spark", type=int, default=0, metavar="N", help="also run jobs/ingest.py over N URLs")
    ap.add_argument("--batch-rows", type=int, default=64, help="ingest.batch_rows (rows per Arrow batch)")
    a = ap.parse_args()
    lake = None
    header(f"URL ingest: URLs/s on one core, {a.latency * 1000:.0f} ms per response")
    server = subprocess.Popen([sys.executable, "-m", "tests.http_server", "--latency", str(a.latency),
                               "--hosts", str(a.hosts), "--files", str(PHOTOS)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(server.stdout.readline())
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from core.config import Http

        d = Http()
        print(f"defaults: ingest.http.concurrency={d.concurrency}, per_host={d.per_host}; "
              f"{len(info['files'])} photos served\n")
        _, base, base_cpu = timed(baseline, urls_for(info["urls"][:1], info["files"], a.baseline_urls, "b"))
        print(f"baseline (sequential urllib.request): {base:.1f} URLs/s over {a.baseline_urls} URLs, "
              f"{base_cpu:.2f} ms CPU per URL\n")
        print("| hosts | urllib3 + threads URLs/s (CPU ms/URL) | ours URLs/s (CPU ms/URL) | ours / baseline "
              "| peak open fds (ours) |")
        print("|---|---|---|---|---|")
        lake = tempfile.mkdtemp(prefix="bench-fetch-")  # the cache the runs write (unique URLs: no hits)
        ours(urls_for(info["urls"], info["files"], 500, "warm"), a.batch_rows, lake)  # imports, first connections
        for hosts in (1, a.hosts):
            bases = info["urls"][:hosts]
            runs = [timed(ours, urls_for(bases, info["files"], a.urls, f"o{hosts}r{r}"), a.batch_rows, lake)
                    for r in range(a.repeat)]
            fds, rate, cpu = sorted(runs, key=lambda x: x[1])[len(runs) // 2]
            runs = [timed(urllib3_threads, urls_for(bases, info["files"], a.urls, f"u{hosts}r{r}"), d.concurrency,
                          d.per_host) for r in range(a.repeat)]
            _, u3, u3_cpu = sorted(runs, key=lambda x: x[1])[len(runs) // 2]
            print(f"| {hosts} | {u3:.0f} ({u3_cpu:.2f}) | {rate:.0f} ({cpu:.2f}) | {rate / base:.1f}x | {fds} |",
                  flush=True)
        if a.spark:
            job(info, a, base)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
        if lake:
            shutil.rmtree(lake, ignore_errors=True)


if __name__ == "__main__":
    main()
