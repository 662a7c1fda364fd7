"""A fault-injecting HTTP proxy in front of the moto S3 server, for the reliability tests: a
real endpoint on 127.0.0.1 that s3a (Spark), pyarrow.fs (executors) and boto3 (driver) talk
to, which fails some requests the way S3 does under load.

Faults are chosen per request by a hash of (method, path, query), so they do not depend on the
order threads send requests in: the first `attempts` tries of one request in every `every`
get a fault; the retry after that goes through. The fault is one of
- 503 SlowDown (S3's throttling answer, with its XML body),
- 500 InternalError,
- a connection reset (RST, no answer), after reading the request,
- a slow answer (`slow` seconds before forwarding; the request then succeeds).
With `attempts` above the client's retries, a request fails for good: the job must then fail
without leaving anything that looks complete. `only` limits the faults to requests whose
'METHOD /path' starts with it.

    with FaultProxy(moto_endpoint, every=7) as proxy:
        ... endpoint=proxy.url ...
        proxy.injected  # {"503": n, "500": n, "reset": n, "slow": n}
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset", "slow")
_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
        '<RequestId>fault-proxy</RequestId></Error>')
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, every: int = 7, attempts: int = 1, slow: float = 1.5,
                 faults: tuple[str, ...] = FAULTS, only: str = ""):
        super().__init__(("127.0.0.1", 0), _Handler)
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.every, self.attempts, self.slow, self.faults = every, attempts, slow, faults
        self.only = only  # faults only for requests starting with this ('HEAD /bucket/images/')
        self.seen: Counter = Counter()
        self.injected: Counter = Counter()
        self.requests = 0
        self.log: list[tuple[float, str, str | None]] = []  # (time, request, fault)
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def fault_for(self, method: str, target: str) -> str | None:
        key = f"{method} {target}"
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        with self.lock:
            self.requests += 1
            tries = self.seen[key]
            self.seen[key] += 1
            fault = None
            if h % self.every == 0 and tries < self.attempts and key.startswith(self.only):
                fault = self.faults[(h // self.every) % len(self.faults)]
                self.injected[fault] += 1
            self.log.append((time.monotonic(), key, fault))
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, as S3 clients use them
    server: FaultProxy

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _error(self, status: int, code: str, msg: str) -> None:
        body = _XML.format(code=code, msg=msg).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.fault_for(self.command, self.path)
        if fault == "503":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "500":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            threading.Event().wait(self.server.slow)
        up = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP and k.lower() not in ("content-length", "expect"):
                    up.putheader(k, v)
            up.putheader("Content-Length", str(len(body)))
            up.endheaders(body)
            resp = up.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":  # a HEAD answer carries the object's length, and no body
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            up.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
