"""A real HTTP/1.1 server on 127.0.0.1 that serves images and the faults URL ingest must survive.

Used by the URL-ingest tests and bench/fetch.py. Paths (every fault keyed, so a test can
count what the client asked for):

    /img/<name>                          the bytes of files[name] (image/jpeg)
    /status/<code>/<name>                that status code, a short text body
    /slow/<seconds>/<name>               files[name] after sleeping (past the client's timeout)
    /retry-after/<seconds>/<key>/<name>  429 with Retry-After: <seconds> the first time, then files[name]
    /flaky/<n>/<key>/<name>              503 for the first n requests, then files[name]
    /reset/<n>/<key>/<name>              the connection reset (TCP RST) for the first n requests, then files[name]
    /loop/<i>                            302 to /loop/<i+1>, for ever
    /redirect/<name>                     302 to /img/<name>
    /big/<bytes>                         a body of that many bytes with its Content-Length
    /stream/<bytes>                      the same without Content-Length (the client must stop reading)
    /html/<name>                         200 text/html: an error page served as if it were the image

`latency` seconds are added before every answer (the benchmark's stand-in for a remote CDN).
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FaultServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None,
              length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _file(self, name: str) -> None:
        data = self.server.files.get(name)
        if data is None:
            self._send(404, b"no such file", "text/plain")
        else:
            self._send(200, data)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        parts = [unquote(p) for p in self.path.split("?", 1)[0].lstrip("/").split("/")]
        key = self.path
        with srv.lock:
            srv.hits[key] += 1
            srv.agents.add(self.headers.get("User-Agent", ""))
            if self.headers.get("Authorization") or self.headers.get("Cookie"):
                srv.credentials_seen += 1
        if srv.latency:
            time.sleep(srv.latency)
        kind = parts[0]
        if kind == "img" and len(parts) == 2:
            return self._file(parts[1])
        if kind == "status" and len(parts) == 3:
            return self._send(int(parts[1]), b"status page", "text/plain")
        if kind == "slow" and len(parts) == 3:
            time.sleep(float(parts[1]))
            return self._file(parts[2])
        if kind in ("retry-after", "flaky", "reset") and len(parts) == 4:
            with srv.lock:
                srv.counts[(kind, parts[2])] += 1
                n = srv.counts[(kind, parts[2])]
            if kind == "retry-after" and n == 1:
                return self._send(429, b"slow down", "text/plain", {"Retry-After": parts[1]})
            if kind == "flaky" and n <= int(parts[1]):
                return self._send(503, b"busy", "text/plain")
            if kind == "reset" and n <= int(parts[1]):
                return self._reset()
            return self._file(parts[3])
        if kind == "loop" and len(parts) == 2:
            return self._send(302, b"", "text/plain", {"Location": f"/loop/{int(parts[1]) + 1}"})
        if kind == "redirect" and len(parts) == 2:
            return self._send(302, b"", "text/plain", {"Location": f"/img/{parts[1]}"})
        if kind in ("big", "stream") and len(parts) == 2:
            return self._send(200, b"\xff\xd8\xff" + b"\0" * (int(parts[1]) - 3), length=kind == "big")
        if kind == "html" and len(parts) == 2:
            return self._send(200, b"<!doctype html><html><body>Page not found</body></html>", "text/html")
        return self._send(404, b"unknown path", "text/plain")


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, files: dict[str, bytes], latency: float = 0.0, host: str = "127.0.0.1"):
        super().__init__((host, 0), _Handler)
        self.files = files
        self.latency = latency
        self.lock = threading.Lock()
        self.hits: collections.Counter = collections.Counter()
        self.counts: collections.Counter = collections.Counter()
        self.agents: set[str] = set()
        self.credentials_seen = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # resets and abandoned bodies are what this server is for

    def start(self) -> "FaultServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    """`python -m tests.http_server --latency 0.1 --hosts 8 --files DIR`: one server on each of
    127.0.0.1 .. 127.0.0.<hosts> (distinct hosts for the per-host limit), pinned to the last
    core; prints their base URLs as one JSON line, serves until killed."""
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--hosts", type=int, default=1)
    ap.add_argument("--files", required=True)
    a = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[-1]})
    files = {p.name: p.read_bytes() for p in sorted(Path(a.files).glob("*.jpg"))}
    servers = [FaultServer(files, a.latency, host=f"127.0.0.{i + 1}").start() for i in range(a.hosts)]
    print(json.dumps({"urls": [s.url for s in servers], "files": sorted(files)}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
