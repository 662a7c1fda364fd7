"""Image URLs (http://, https://) for ingest: fetched on executors with aiohttp, bounded,
retried, and cached in the lake so that a re-run fetches only what is not fetched yet.

Bounds, whatever the manifest's size:
- at most `concurrency` requests in flight per executor and `per_host` per host, across all
  the executor's tasks (each Python worker is its own process: a slot is a byte-range lock
  on a key's lock file in the executor's work folder, beside asyncio semaphores in-process);
- one open socket per request in flight (aiohttp's connector has the same limits), one lock
  file per key in use; bodies are streamed and abandoned past `max_bytes`.

Every URL ends as bytes or as a Reason with a detail: http_status (the code in the detail),
timeout, too_large, too_many_redirects, connection_error, not_an_image (a 200 whose bytes are
no image format: an HTML page), empty_image, private_address. Connection errors, 429 and 5xx
are retried with exponential backoff and full jitter, honouring Retry-After; timeouts are not
retried within a run (a slow server stays slow) but, like the other transient failures, are
not cached, so the next run tries again. Redirects are followed by hand so that every hop's
host is checked; names are checked where they resolve (the connector's resolver), so a
redirect or a DNS answer cannot point executors at loopback, private or link-local
addresses unless allow_private is set. No cookies, no credentials, no proxy settings from
the environment are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterator

import aiohttp
import pyarrow as pa
from yarl import URL

from core import storage
from core.config import Http
from core.schemas import Reason
from sparkml.images.resize import sniff

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
UNIT = 256  # URLs a task hands the event loop at once
# Outcomes a later run would get again: cached beside the bytes so that it does not ask.
PERMANENT = {Reason.HTTP_STATUS, Reason.TOO_LARGE, Reason.TOO_MANY_REDIRECTS, Reason.NOT_AN_IMAGE,
             Reason.EMPTY_IMAGE, Reason.PRIVATE_ADDRESS}


@dataclass
class Result:
    """One URL's outcome: data, or reason + detail; with what it cost."""

    data: bytes | None = None
    reason: Reason | None = None
    detail: str | None = None
    requests: int = 0
    retries: int = 0
    nbytes: int = 0
    retry_after: float | None = None
    transient: bool = False


def open_files() -> int:
    """File descriptors this process has open (sockets, lock files, cache files)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


# ---------------------------------------------------------------- address checks


class PrivateAddress(OSError):
    """A host that is, or resolves to, a loopback, private, link-local or reserved address."""


def _public(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    return not (a.is_private or a.is_loopback or a.is_link_local or a.is_reserved or a.is_multicast
                or a.is_unspecified)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """The default resolver, with every private answer dropped: the connector connects only to
    the addresses this returns, so the check and the connection see the same address."""

    def __init__(self, allow_private: bool):
        self._inner = aiohttp.ThreadedResolver()
        self._allow = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        if self._allow:
            return infos
        public = [i for i in infos if _public(i["host"])]
        if not public:
            raise PrivateAddress(f"{host} resolves to {infos[0]['host']}, not a public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def _literal_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- slots across the executor's processes


class _Key:
    """One key's slots in this process: a semaphore, the lock file, the slot numbers held."""

    def __init__(self, path: str, n: int):
        self.sem = asyncio.Semaphore(n)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.held: set[int] = set()
        self.users = 0


class Slots:
    """At most `n` holders per key across the processes sharing `folder` (one executor's
    Python workers) and the coroutines of this process. Slot i of a key is byte i of the
    key's lock file, locked with fcntl (POSIX record locks: between processes; the process
    keeps its own set, as its locks do not exclude itself). One descriptor per key in use."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._keys: dict[str, _Key] = {}  # dropped when unused, closing the descriptor

    @contextlib.asynccontextmanager
    async def hold(self, key: str, n: int):
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _Key(os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest()[:16]), n)
        k.users += 1
        try:
            async with k.sem:
                i = await self._take(k, n)
                try:
                    yield
                finally:
                    fcntl.lockf(k.fd, fcntl.LOCK_UN, 1, i)
                    k.held.discard(i)
        finally:
            k.users -= 1
            if not k.users:
                del self._keys[key]
                os.close(k.fd)  # nothing held: closing releases nothing

    @staticmethod
    async def _take(k: _Key, n: int) -> int:
        delay = 0.002
        while True:
            start = random.randrange(n)
            for j in range(n):
                i = (start + j) % n
                if i in k.held:
                    continue
                try:
                    fcntl.lockf(k.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
                except OSError:  # EAGAIN / EACCES: another process holds it
                    continue
                k.held.add(i)
                return i
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.05)


def slots_folder() -> str:
    """The executor's own work folder inside a Spark worker (shared by its Python workers,
    distinct between executors on one node); a temporary folder elsewhere."""
    try:
        from pyspark import SparkFiles
        root = SparkFiles.getRootDirectory()
    except Exception:  # not in a Spark worker (bench, tests of this module)
        root = tempfile.gettempdir()
    return os.path.join(root, f"instalearn-http-slots-{os.getuid()}")


# ---------------------------------------------------------------- one URL


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """The HTTP client of one process: one aiohttp session, the slots, the options."""

    def __init__(self, opts: Http, slots: Slots):
        self.opts, self.slots = opts, slots
        self.timeout = aiohttp.ClientTimeout(total=opts.timeout, connect=opts.connect_timeout,
                                             sock_read=opts.read_timeout)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Fetcher":
        o = self.opts
        connector = aiohttp.TCPConnector(limit=o.concurrency, limit_per_host=o.per_host,
                                         resolver=GuardedResolver(o.allow_private), ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            headers={"User-Agent": o.user_agent, "Accept": "image/*,*/*;q=0.5"}, auto_decompress=True)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def get(self, url: str) -> Result:
        """The URL's image bytes or why not, retrying transient failures."""
        o = self.opts
        total = Result()
        for attempt in range(o.retries + 1):
            r = await self._follow(url)
            total.requests += r.requests
            total.nbytes += r.nbytes
            if not r.transient or attempt == o.retries:
                break
            wait = r.retry_after if r.retry_after is not None else \
                random.uniform(0, min(o.max_backoff, o.backoff * 2 ** attempt))
            if wait > o.max_retry_after:
                r.detail = f"{r.detail}; Retry-After {wait:.0f} s is over ingest.http.max_retry_after"
                break
            total.retries += 1
            await asyncio.sleep(wait)
        r.requests, r.retries, r.nbytes = total.requests, total.retries, total.nbytes
        return r

    async def _follow(self, url: str) -> Result:
        """One attempt: the URL and its redirects, every hop's host checked."""
        o = self.opts
        current = URL(url)
        requests = 0
        for _ in range(o.max_redirects + 1):
            if current.scheme not in ("http", "https") or not current.host:
                return Result(reason=Reason.HTTP_STATUS, detail=f"redirected to unsupported URL {str(current)[:200]}",
                              requests=requests)
            if not o.allow_private and _literal_ip(current.host) and not _public(current.host):
                return Result(reason=Reason.PRIVATE_ADDRESS, requests=requests,
                              detail=f"{current.host} is not a public address (ingest.http.allow_private=false)")
            requests += 1
            try:
                async with self.slots.hold("*", o.concurrency), self.slots.hold(current.host, o.per_host):
                    async with self.session.get(current.with_user(None), allow_redirects=False) as resp:
                        if resp.status in REDIRECTS:
                            loc = resp.headers.get("Location")
                            if not loc:
                                return Result(reason=Reason.HTTP_STATUS, requests=requests,
                                              detail=f"{resp.status} redirect without Location")
                            current = current.join(URL(loc))
                            continue
                        r = await self._body(resp)
                        r.requests = requests
                        return r
            except PrivateAddress as e:
                return Result(reason=Reason.PRIVATE_ADDRESS, detail=str(e), requests=requests)
            except aiohttp.ClientConnectorDNSError as e:
                if isinstance(e.os_error, PrivateAddress):
                    return Result(reason=Reason.PRIVATE_ADDRESS, detail=str(e.os_error), requests=requests)
                return Result(reason=Reason.CONNECTION_ERROR, detail=f"DNS: {e}"[:300], requests=requests,
                              transient=True)
            except (asyncio.TimeoutError, TimeoutError):
                return Result(reason=Reason.TIMEOUT, requests=requests,
                              detail=f"no answer within ingest.http timeouts (connect {o.connect_timeout:g} s, "
                                     f"read {o.read_timeout:g} s, total {o.timeout:g} s)")
            except (aiohttp.ClientError, OSError) as e:
                return Result(reason=Reason.CONNECTION_ERROR, detail=f"{type(e).__name__}: {e}"[:300],
                              requests=requests, transient=True)
        return Result(reason=Reason.TOO_MANY_REDIRECTS, requests=requests,
                      detail=f"more than ingest.http.max_redirects={o.max_redirects} redirects")

    async def _body(self, resp: aiohttp.ClientResponse) -> Result:
        o = self.opts
        if resp.status == 429 or resp.status >= 500 or resp.status == 408:
            return Result(reason=Reason.HTTP_STATUS, detail=f"{resp.status} {resp.reason or ''}".strip(),
                          transient=True, retry_after=_retry_after(resp.headers.get("Retry-After")))
        if not 200 <= resp.status < 300:
            return Result(reason=Reason.HTTP_STATUS, detail=f"{resp.status} {resp.reason or ''}".strip())
        if resp.content_length is not None and resp.content_length > o.max_bytes:
            return Result(reason=Reason.TOO_LARGE,
                          detail=f"Content-Length {resp.content_length} > ingest.http.max_bytes={o.max_bytes}")
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK):
            buf += chunk
            if len(buf) > o.max_bytes:
                return Result(reason=Reason.TOO_LARGE, nbytes=len(buf),
                              detail=f"body past ingest.http.max_bytes={o.max_bytes} (stopped reading)")
        data = bytes(buf)
        if not data:
            return Result(reason=Reason.EMPTY_IMAGE, detail=f"{resp.status} with an empty body")
        if sniff(data) is None:
            return Result(reason=Reason.NOT_AN_IMAGE, nbytes=len(data),
                          detail=f"{resp.status} {resp.content_type}, leading bytes {data[:8].hex()}")
        return Result(data=data, nbytes=len(data))


# ---------------------------------------------------------------- the cache (resume)


def cache_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def cache_uris(cache: str, url: str) -> tuple[str, str]:
    """(the bytes' URI, the permanent reject's URI) of a URL in the cache folder."""
    k = cache_key(url)
    return f"{cache}/{k[:2]}/{k}", f"{cache}/{k[:2]}/{k}.reject.json"


@dataclass
class Outcome:
    """What a URL became in this run: cached bytes, or a reason; `skipped` if a previous run
    had already fetched it."""

    size: int | None = None
    reason: str | None = None
    detail: str | None = None
    skipped: bool = False
    result: Result | None = None


class CachedFetcher:
    """Fetcher over the lake's cache: what a previous run fetched (or refused for good) is
    taken from there; new bytes are written there before they count as fetched."""

    def __init__(self, fetcher: Fetcher, cache: str, endpoint: str | None, region: str | None, io_threads: int):
        self.fetcher, self.cache, self.endpoint, self.region = fetcher, cache, endpoint, region
        # a local cache answers in microseconds: inline, one thread; an object store in a pool
        self.local = storage.qualify(cache).startswith("file://")
        self.io_threads = 1 if self.local else io_threads
        self.done = 0
        self.peak_open_files = open_files()

    async def _io(self, fn, *args):
        if self.local:
            return fn(*args)
        # the loop's default executor: a bounded thread pool (object stores are slow to answer)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def batch(self, urls: list[str]) -> list[Outcome]:
        """Outcomes of urls, in order; a URL repeated in the batch is fetched once."""
        unique = list(dict.fromkeys(urls))
        where = [cache_uris(self.cache, u) for u in unique]
        found = await self._io(storage.sizes, [w[0] for w in where] + [w[1] for w in where], self.io_threads,
                               self.endpoint, self.region)
        data, rejected = found[:len(unique)], found[len(unique):]
        outs, fetch, marked = {}, [], []
        for u, w, n, m in zip(unique, where, data, rejected):
            if n:  # a zero-length entry is what a power cut can leave of an unsynced write: fetch again
                outs[u] = Outcome(size=n, skipped=True)
            elif m is not None:
                marked.append((u, w))
            else:
                fetch.append((u, w))
        markers = await self._io(storage.read_many, [w[1] for _, w in marked], self.io_threads, self.endpoint,
                                 self.region)
        for (u, _), m in zip(marked, markers):
            m = json.loads(m)
            outs[u] = Outcome(reason=m["reason"], detail=m["detail"], skipped=True)
        for (u, _), out in zip(fetch, await asyncio.gather(*[self._fetch(u, w) for u, w in fetch])):
            outs[u] = out
        self.peak_open_files = max(self.peak_open_files, open_files())
        return [outs[u] for u in urls]

    async def _fetch(self, url: str, where: tuple[str, str]) -> Outcome:
        r = await self.fetcher.get(url)
        self.done += 1
        if self.done % 16 == 0:
            self.peak_open_files = max(self.peak_open_files, open_files())
        if r.data is not None:
            await self._io(storage.write_uri, where[0], r.data, self.endpoint, self.region, False)
            return Outcome(size=len(r.data), result=r)
        if r.reason in PERMANENT and not r.transient:  # a 503 after the last retry may pass next time
            body = json.dumps({"reason": r.reason.value, "detail": r.detail}).encode()  # no URL: it may hold a password
            await self._io(storage.write_uri, where[1], body, self.endpoint, self.region, False)
        return Outcome(reason=r.reason.value, detail=r.detail, result=r)


# ---------------------------------------------------------------- Arrow batches on an executor


OUTPUT = pa.schema([("read_uri", pa.string()), ("image_size", pa.int64()), ("_reason", pa.string()),
                    ("_detail", pa.string()), ("_skipped", pa.bool_()), ("_requests", pa.int64()),
                    ("_retries", pa.int64()), ("_bytes", pa.int64()), ("_open_files", pa.int64())])


def fetch_batches(batches: Iterator[pa.RecordBatch], column: str, opts: Http, cache: str,
                  endpoint: str | None = None, region: str | None = None,
                  slots: str | None = None, io_threads: int = 16) -> Iterator[pa.RecordBatch]:
    """Each batch with OUTPUT's columns appended for the URLs in `column`, in order. One event
    loop per task runs in a thread; batches overlap so the slots stay full across them. Cache
    lookups and writes run on `io_threads` threads (ingest.read_threads)."""
    loop = asyncio.new_event_loop()
    io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="fetch-io")
    loop.set_default_executor(io_pool)
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="fetch-loop")
    thread.start()

    async def start() -> CachedFetcher:
        f = await Fetcher(opts, Slots(slots or slots_folder())).__aenter__()
        return CachedFetcher(f, cache, endpoint, region, io_threads)

    def finished(b: pa.RecordBatch, outs: list[Outcome]) -> pa.RecordBatch:
        res = [o.result or Result() for o in outs]
        cols = [
            pa.array([cache_uris(cache, u)[0] if o.size is not None else None
                      for u, o in zip(b.column(column).to_pylist(), outs)], pa.string()),
            pa.array([o.size for o in outs], pa.int64()),
            pa.array([o.reason for o in outs], pa.string()),
            pa.array([o.detail for o in outs], pa.string()),
            pa.array([o.skipped for o in outs], pa.bool_()),
            pa.array([r.requests for r in res], pa.int64()),
            pa.array([r.retries for r in res], pa.int64()),
            pa.array([r.nbytes for r in res], pa.int64()),
            pa.array([cf.peak_open_files] * len(outs), pa.int64()),
        ]
        return pa.RecordBatch.from_arrays(list(b.columns) + cols, schema=_joined(b.schema))

    cf = asyncio.run_coroutine_threadsafe(start(), loop).result()
    # Units of >= UNIT rows, as many in flight as keep twice the slots busy; each is yielded
    # when it completes (row order means nothing to Spark), so one slow URL holds up only its own.
    ahead = max(2, -(-2 * opts.concurrency // UNIT))
    pending: dict = {}

    def submit(unit: pa.RecordBatch) -> None:
        pending[asyncio.run_coroutine_threadsafe(cf.batch(unit.column(column).to_pylist()), loop)] = unit

    def completed(block: bool) -> Iterator[pa.RecordBatch]:
        done, _ = wait(list(pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for fut in done:
            yield finished(pending.pop(fut), fut.result())

    try:
        for unit in _units(batches, UNIT):
            submit(unit)
            yield from completed(block=len(pending) > ahead)
        while pending:
            yield from completed(block=True)
    finally:
        asyncio.run_coroutine_threadsafe(cf.fetcher.__aexit__(None, None, None), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        io_pool.shutdown()


def _units(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches regrouped into batches of at least `rows` rows (the last may be smaller)."""
    buf, n = [], 0
    for b in batches:
        buf.append(b)
        n += b.num_rows
        if n >= rows:
            yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]
            buf, n = [], 0
    if n:
        yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]


def _joined(schema: pa.Schema) -> pa.Schema:
    out = schema
    for f in OUTPUT:
        out = out.append(f)
    return out
