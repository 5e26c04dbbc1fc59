"""Real servers on loopback for the remote tests: moto's S3 API and a plain HTTP server with
Range support, each counting the requests it answers and the body bytes it sends.

>>> with s3_server() as s3:  # doctest: +SKIP
...     s3.upload(path, "bucket/model.pth")
...     run(tmp, "info", s3.url("bucket/model.pth"), **s3.env)
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
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


@dataclass
class Counted:
    """What a server answered since :meth:`reset`."""

    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def add(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def to(self, fragment: str) -> list[Request]:
        """The requests whose path holds ``fragment``."""
        return [r for r in self.requests if fragment in r.path]

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.requests)


class S3Server(Counted):
    """moto's S3 app in this process, on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        super().__init__()
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            body = list(app(environ, start_response))
            self.add(
                Request(
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""),
                    environ.get("HTTP_RANGE"),
                    sum(len(b) for b in body),
                )
            )
            return body

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
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server, with this process's AWS settings pointing at it while it runs."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeServer(Counted):
    """``http.server`` over a folder, answering HEAD and GET with ``Range: bytes=a-b``."""

    def __init__(self, root: Path) -> None:
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
                if target is None:
                    self.send_error(404)
                    counted.add(Request(self.command, self.path, "", header, 0))
                    return
                size = target.stat().st_size
                start, end = 0, size
                match = _RANGE.match(header or "")
                if match:
                    first, last = match.groups()
                    start = int(first) if first else size - int(last)
                    end = min(size, int(last) + 1) if first and last else size
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                sent = 0
                if body:
                    with open(target, "rb") as f:
                        f.seek(start)
                        data = f.read(end - start)
                    self.wfile.write(data)
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
def range_server(root: Path) -> Iterator[RangeServer]:
    server = RangeServer(root)
    try:
        yield server
    finally:
        server.close()
