"""Real servers on loopback for the remote tests: moto's S3 API and a plain HTTP server with
Range support, each counting the requests it answers and the body bytes it sends.

>>> with s3_server() as s3:  # doctest: +SKIP
...     s3.upload(path, "bucket/model.pth")
...     run(tmp, "info", s3.url("bucket/model.pth"), **s3.env)
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Dummy credentials: the tests assert that neither value ever reaches the output.
ACCESS_KEY = "AKIACKPTMIGRATETEST0"
SECRET_KEY = "ckptmigrate-secret-never-printed-0123456789"


@dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    sent: int  # body bytes
    received: int = 0  # request body bytes (an uploaded part, a PUT)
    copy_source: str | None = None  # x-amz-copy-source: a server-side copy's source
    copy_range: str | None = None  # x-amz-copy-source-range


#: What a server can do wrong, set per object by ``server.faults[fragment] = FAULT``:
#: ``error`` answers 500; ``slow`` waits :data:`SLOW_SECONDS` before answering; ``short``
#: sends half of each range asked (an honest Content-Length); ``huge`` claims a size of a
#: petabyte (ranges past the real end: 416); ``no-range`` ignores Range, sending every byte.
FAULTS = ("error", "slow", "short", "huge", "no-range")
SLOW_SECONDS = 6.0
HUGE = 10**15


@dataclass
class Counted:
    """What a server answered since :meth:`reset`, and the faults it plays."""

    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    faults: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()

    def fault(self, path: str) -> str | None:
        """The fault played on requests whose path holds one of :attr:`faults`' fragments
        (an S3 request's path is followed by ``?`` and its query: ``partNumber=2`` matches)."""
        return next((f for frag, f in self.faults.items() if frag in path), None)

    def add(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def to(self, fragment: str) -> list[Request]:
        """The requests whose path holds ``fragment``."""
        return [r for r in self.requests if fragment in r.path]

    def by_kind(self) -> dict[str, int]:
        """How many requests of each kind were answered: ``LIST`` (a GET with a query, as
        S3's ListObjectsV2), ``GET`` (an object's bytes), ``HEAD``, and other methods."""
        counts: dict[str, int] = {}
        with self.lock:
            for r in self.requests:
                kind = "LIST" if r.method == "GET" and r.query else r.method
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.requests)


class S3Server(Counted):
    """moto's S3 app in this process, on 127.0.0.1 and a free port; ``latency`` seconds are
    waited before each request is answered (a store across a network, for the benchmarks)."""

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__()
        self.latency = latency
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            if self.latency:
                time.sleep(self.latency)
            where = environ.get("PATH_INFO", "")
            fault = self.fault(f"{where}?{environ.get('QUERY_STRING', '')}")
            if fault == "slow":
                time.sleep(SLOW_SECONDS)
            if fault == "error":
                start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
                body = [b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"]
            else:
                body = list(app(environ, start_response))
            self.add(
                Request(
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""),
                    environ.get("HTTP_RANGE"),
                    sum(len(b) for b in body),
                    int(
                        environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
                        or environ.get("CONTENT_LENGTH")
                        or 0
                    ),
                    environ.get("HTTP_X_AMZ_COPY_SOURCE"),
                    environ.get("HTTP_X_AMZ_COPY_SOURCE_RANGE"),
                )
            )
            return body

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.endpoint = f"http://127.0.0.1:{self.server.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload(self, local: Path, key: str) -> str:
        """Put the file (or every file under the folder) ``local`` at ``bucket/key``; its URL."""
        bucket, _, prefix = key.partition("/")
        client = self.client()
        if local.is_dir():
            for p in sorted(local.rglob("*")):
                if p.is_file():
                    client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")
        else:
            client.upload_file(str(local), bucket, prefix)
        return f"s3://{key}"

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def s3_server(latency: float = 0.0) -> Iterator[S3Server]:
    """moto's S3 server, with this process's AWS settings pointing at it while it runs."""
    server = S3Server(latency)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _forget_s3_clients()  # fsspec keeps S3 clients by their options, not by the endpoint
    try:
        yield server
    finally:
        _forget_s3_clients()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


def _forget_s3_clients() -> None:
    """Drop fsspec's cached S3 file systems: a client made while another server (another
    port in ``AWS_ENDPOINT_URL``) ran would keep calling that one."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeServer(Counted):
    """``http.server`` over a folder, answering HEAD and GET with ``Range: bytes=a-b``; with
    ``etags``, each answer carries an ETag made of the file's size and modification time."""

    def __init__(self, root: Path, etags: bool = False) -> None:
        super().__init__()
        counted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _file(self) -> Path | None:
                target = (root / self.path.split("?")[0].lstrip("/")).resolve()
                ok = target.is_file() and root.resolve() in target.parents
                return target if ok else None

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                target = self._file()
                header = self.headers.get("Range")
                fault = counted.fault(self.path)
                if fault == "slow":
                    time.sleep(SLOW_SECONDS)
                if target is None or fault == "error":
                    self.send_error(404 if target is None else 500)
                    counted.add(Request(self.command, self.path, "", header, 0))
                    return
                size = target.stat().st_size
                claimed = HUGE if fault == "huge" else size
                start, end = 0, size
                match = None if fault == "no-range" else _RANGE.match(header or "")
                if match:
                    first, last = match.groups()
                    start = int(first) if first else size - int(last)
                    end = min(size, int(last) + 1) if first and last else size
                    if start >= size:
                        self.send_error(416)
                        counted.add(Request(self.command, self.path, "", header, 0))
                        return
                    if fault == "short":
                        end = start + max(1, (end - start) // 2)
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(claimed if not body else end - start))
                self.send_header("Accept-Ranges", "bytes")
                if etags:
                    self.send_header("ETag", f'"{size}-{target.stat().st_mtime_ns}"')
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{claimed}")
                self.end_headers()
                sent = 0
                if body:
                    with open(target, "rb") as f:
                        f.seek(start)
                        data = f.read(end - start)
                    try:
                        self.wfile.write(data)
                    except OSError:  # the client stopped reading (a range it did not ask)
                        pass
                    sent = len(data)
                counted.add(Request(self.command, self.path, "", header, sent))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def range_server(root: Path, etags: bool = False) -> Iterator[RangeServer]:
    server = RangeServer(root, etags)
    try:
        yield server
    finally:
        server.close()
