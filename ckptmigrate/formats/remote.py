"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``https://``...): a path-like
:class:`RemotePath` the format readers take where they take a local :class:`~pathlib.Path`,
and a seekable file over it that reads by exact byte ranges.

A metadata read never downloads the object: the readers ask for what they need (a zip's end
record and central directory, ``data.pkl``; a safetensors header; an index; ``.metadata``)
and each miss becomes one ranged GET of at least :data:`BLOCK_BYTES` (a read in the last
block fetches the whole tail, where a zip keeps its end records and central directory), so
a torch zip's metadata costs a few requests. The bounds the readers apply to a local file
(``formats/bounds.py``, the pickle and header caps) run on these bytes unchanged. Everything
one read learns (sizes, listings, fetched blocks) lives in the :class:`RemoteStore` its paths
share, so a sniff and the read after it ask the server once. fsspec and the protocol's
package (s3fs, gcsfs...) are imported only when a URL is read: ``pip install
'ckptmigrate[remote]'``. Credentials come from the protocol's own chain (environment,
config files); a URL is printed without its user info or query string.

>>> where = location("s3://models/llama/model.pth")  # doctest: +SKIP
>>> where.name, where.stat().st_size  # doctest: +SKIP
('model.pth', 1207959552)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..base.frozen import FrozenRecord, set_fields
from ..base.readable import path_text
from ..errors import CheckpointFormatError, RemoteStorageError, RemoteWriteError

__all__ = [
    "BLOCK_BYTES",
    "CREDENTIALS_HINT",
    "DEFAULT_TIMEOUT",
    "Location",
    "MAX_CONNECTIONS",
    "MAX_RANGE_BYTES",
    "RemoteFile",
    "RemotePath",
    "RemoteStore",
    "downloaded",
    "failure_reason",
    "is_remote",
    "is_url",
    "location",
    "request_timeout",
    "store_error",
]

#: The least one ranged GET fetches: a 64-byte sniff brings the first block, where a torch
#: zip keeps ``data.pkl`` and a safetensors file its header.
BLOCK_BYTES = 64 << 10
#: Fetched blocks kept per store (reads larger than four blocks are served and not kept).
_KEPT_BLOCKS = 16
#: One ranged read asks for at most this much (a metadata read needs kilobytes; the largest
#: part a reader takes whole, a torch zip's ``data.pkl``, is capped at 1 GiB too).
MAX_RANGE_BYTES = 1 << 30
#: Seconds a request may wait to connect or for the next bytes, unless the environment
#: variable ``CKPTMIGRATE_REMOTE_TIMEOUT`` says otherwise.
DEFAULT_TIMEOUT = 60.0
#: Connections one S3 file system keeps open at once (a scan's ``--jobs`` up to this run
#: side by side).
MAX_CONNECTIONS = 64
#: The package each protocol needs, and the extra that installs it.
_PACKAGES = {
    "s3": ("s3fs", "remote"),
    "s3a": ("s3fs", "remote"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "remote"),
    "https": ("aiohttp", "remote"),
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL string (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def is_remote(path: object) -> bool:
    """Whether ``path`` names a checkpoint read through fsspec (not the local file system)."""
    return isinstance(path, RemotePath) or (is_url(path) and not _is_file_url(str(path)))


def _is_file_url(url: str) -> bool:
    return url.lower().startswith(("file://", "local://"))


class _Stat(FrozenRecord):
    """What ``os.stat`` tells of a local file, for an object: its size and kind (and, for
    a file's identity, its modification time; device and inode are 0)."""

    __slots__ = ("st_size", "st_mode", "st_mtime_ns", "st_dev", "st_ino", "etag")
    st_size: int
    st_mode: int
    st_mtime_ns: int
    st_dev: int
    st_ino: int
    etag: str | None

    def __init__(
        self,
        st_size: int,
        st_mode: int,
        st_mtime_ns: int = 0,
        st_dev: int = 0,
        st_ino: int = 0,
        etag: str | None = None,
    ) -> None:
        set_fields(
            self,
            st_size=st_size,
            st_mode=st_mode,
            st_mtime_ns=st_mtime_ns,
            st_dev=st_dev,
            st_ino=st_ino,
            etag=etag,
        )


class RemoteStore:
    """One fsspec file system and what reads through it learned: object infos, folder
    listings and fetched blocks, and how many requests and bytes that took.

    One store serves one read (the paths made from one :func:`location` call and their
    children), so nothing stale outlives it.
    """

    def __init__(self, fs: Any, protocol: str, url_prefix: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.url_prefix = url_prefix  # what goes before a key to make a URL again
        self.requests = 0
        self.bytes_read = 0
        self._infos: dict[str, dict[str, Any] | None] = {}
        self._listed: dict[str, list[dict[str, Any]]] = {}
        self._blocks: list[tuple[str, int, bytes]] = []
        import threading  # only a remote read makes a store: a local one never imports it

        self._lock = threading.Lock()

    def url(self, key: str) -> str:
        return self.url_prefix + key

    def for_one_read(self) -> RemoteStore:
        """A store that shares this one's file system and what its listings said, with a
        block cache of its own: reads of many objects at once (a scan's threads) do not
        evict each other's blocks and ask for them again."""
        child = RemoteStore(self.fs, self.protocol, self.url_prefix)
        child._infos, child._listed, child._lock = self._infos, self._listed, self._lock
        return child

    def known_under(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        """``(key, info)`` of every object a listing has shown under the folder ``key``,
        by key (no request: what :meth:`remember` and :meth:`listing` kept)."""
        inside = key.rstrip("/") + "/"
        with self._lock:
            found = [
                (k, info)
                for k, info in self._infos.items()
                if k.startswith(inside) and info is not None and info.get("type") != "directory"
            ]
        return sorted(found, key=lambda pair: pair[0])

    def call(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` against the server; its failures as ckptmigrate errors (a missing
        object stays a ``FileNotFoundError`` for the caller to say so)."""
        self.requests += 1
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            if not _not_found(exc.__cause__):  # fsspec's http says so of any failed HEAD
                raise RemoteStorageError(self.url(key), failure_reason(exc.__cause__)) from None
            raise
        except CheckpointFormatError:
            raise
        except Exception as exc:  # the protocol's own errors: botocore, aiohttp, timeouts...
            raise store_error(self.url(key), exc) from None

    def remember(self, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``found`` (fsspec's ``{name: info}`` of a listing), its infos kept for later asks."""
        with self._lock:
            for name, info in found.items():
                if info:  # fsspec's find says ``{path: {}}`` of a file it did not list
                    self._infos.setdefault(_key(self, name), info)
        return found

    def info(self, key: str) -> dict[str, Any] | None:
        """The object or folder at ``key`` (fsspec's info: ``size``, ``type``), None if none."""
        key = key.rstrip("/")
        with self._lock:
            if key in self._infos:
                return self._infos[key]
            parent = key.rpartition("/")[0]
            if parent in self._listed:
                return self._infos.get(key)
        try:
            found: dict[str, Any] | None = self.call(key, self.fs.info, key)
        except FileNotFoundError:
            found = None
        with self._lock:
            self._infos[key] = found
        return found

    def listing(self, key: str) -> list[dict[str, Any]]:
        """The entries of the folder at ``key`` (one request, then remembered)."""
        key = key.rstrip("/")
        with self._lock:
            if key in self._listed:
                return self._listed[key]
        try:
            entries = self.call(key, self.fs.ls, key, detail=True)
        except FileNotFoundError:
            entries = []
        entries = [e for e in entries if _key(self, e["name"]) != key]
        with self._lock:
            self._listed[key] = entries
            for entry in entries:
                self._infos[_key(self, entry["name"])] = entry
        return entries

    def pread(self, key: str, offset: int, n: int, size: int) -> bytes:
        """Up to ``n`` bytes of the object at ``key`` (``size`` bytes long) from ``offset``."""
        end = min(size, offset + n)
        if offset >= end:
            return b""
        with self._lock:
            for k, start, data in self._blocks:
                if k == key and start <= offset and end <= start + len(data):
                    return data[offset - start : end - start]
        first, last = offset, min(size, offset + max(n, BLOCK_BYTES))
        if offset >= size - BLOCK_BYTES:
            first = max(0, min(offset, size - BLOCK_BYTES))  # the whole tail, in one GET
        if last - first > MAX_RANGE_BYTES:
            raise RemoteStorageError(
                self.url(key),
                f"a read of {last - first} bytes at offset {first} is refused (over "
                f"{MAX_RANGE_BYTES >> 20} MiB: no metadata read needs that much; the object's "
                "claimed sizes are not a checkpoint's)",
            )
        data = self.call(key, self._fetch, key, first, last, size)
        self.bytes_read += len(data)
        if len(data) != last - first:
            raise RemoteStorageError(
                self.url(key),
                f"the server sent {len(data)} bytes for the range {first}-{last - 1} of an "
                f"object of {size} bytes: the object is shorter than it claims, changed while "
                "it was read, or the server ignores ranges",
            )
        if len(data) <= 4 * BLOCK_BYTES:
            with self._lock:
                self._blocks.append((key, first, data))
                del self._blocks[:-_KEPT_BLOCKS]
        return data[offset - first : end - first]

    def _fetch(self, key: str, first: int, last: int, size: int) -> bytes:
        if self.protocol in ("http", "https"):
            # fsspec's http file reads a range by streaming it and stops at its end, also
            # from a server that ignores Range (its cat_file would read the whole body)
            with self.fs.open(key, "rb", block_size=BLOCK_BYTES, cache_type="none", size=size) as f:
                f.seek(first)
                return f.read(last - first)
        return self.fs.cat_file(key, start=first, end=last)


def _not_found(cause: BaseException | None) -> bool:
    """Whether the error behind a ``FileNotFoundError`` says the object is missing (a 404),
    not that the server failed, refused or never answered."""
    if cause is None or isinstance(cause, FileNotFoundError):
        return True
    status = getattr(cause, "status", None)  # aiohttp's response errors
    if isinstance(status, int):
        return status in (404, 410)
    response = getattr(cause, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
    return not isinstance(cause, (OSError, TimeoutError))  # timeouts, refused connections


def _key(store: RemoteStore, name: str) -> str:
    """fsspec's name for an entry, as the key our paths use (no protocol, no trailing /)."""
    return store.fs._strip_protocol(name).rstrip("/")


CREDENTIALS_HINT = (
    " (credentials come from the protocol's own chain: environment variables such as "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or its config files)"
)
_SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def failure_reason(exc: BaseException) -> str:
    """What ``exc`` says, on one line, as it may be printed: URLs in it without their user
    info or query string, no secret from the environment."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    text = _URL_IN_TEXT.sub(lambda m: path_text(m.group(0)), text)
    for var in _SECRET_VARIABLES:
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"[:500]


def store_error(
    url: str,
    exc: BaseException,
    error: type[RemoteStorageError] | type[RemoteWriteError] = RemoteStorageError,
) -> RemoteStorageError | RemoteWriteError:
    """A store's failure ``exc`` as the error to raise (``error``: a read's or a write's),
    its :func:`failure_reason`, naming where credentials come from when they were refused.

    >>> store_error("s3://models/a.pth", TimeoutError("read timed out")).reason
    'TimeoutError: read timed out'
    """
    hint = CREDENTIALS_HINT if isinstance(exc, PermissionError) else ""
    return error(url, failure_reason(exc) + hint)


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file over one object; each read is a :meth:`RemoteStore.pread`.

    ``size`` is the object's length (a local file's ``fstat``); it has no ``fileno``.
    """

    def __init__(self, store: RemoteStore, key: str, size: int) -> None:
        super().__init__()
        self.store, self.key, self.size = store, key, size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise CheckpointFormatError(
                f"an offset before the object's start ({base + offset})",
                path=path_text(self.store.url(self.key)),
            )
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.store.pread(self.key, self._pos, len(view), self.size)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self.size - self._pos)
        data = self.store.pread(self.key, self._pos, n, self.size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)


class RemotePath(FrozenRecord):
    """An object or folder behind a URL, with the few :class:`~pathlib.Path` methods the
    readers use (``/``, ``name``, ``suffix``, ``parent``, ``stat``, ``is_file``, ``is_dir``,
    ``glob``, ``rglob``, ``open``). ``str()`` is the URL as it may be printed. Immutable."""

    __slots__ = ("store", "key")
    store: RemoteStore
    key: str

    def __init__(self, store: RemoteStore, key: str) -> None:
        set_fields(self, store=store, key=key)

    def __str__(self) -> str:
        return path_text(self.store.url(self.key))

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    # the same URL is the same path, whichever store (each location() call's own) it is on
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RemotePath)
            and other.store.url_prefix == self.store.url_prefix
            and other.key == self.key
        )

    def __hash__(self) -> int:
        return hash((self.store.url_prefix, self.key))

    def __lt__(self, other: RemotePath) -> bool:
        return self.key < other.key

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.store, f"{self.key.rstrip('/')}/{name.lstrip('/')}")

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.store, self.key.rpartition("/")[0] or self.key)

    def _info(self) -> dict[str, Any] | None:
        return self.store.info(self.key)

    def for_one_read(self) -> RemotePath:
        """This path on a store of its own blocks (:meth:`RemoteStore.for_one_read`)."""
        return RemotePath(self.store.for_one_read(), self.key)

    def exists(self) -> bool:
        return self._info() is not None

    def is_dir(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") != "directory"

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> _Stat:
        """Size and kind (``os.stat`` of a local file); a missing object is the error a
        missing local file is."""
        info = self._info()
        if info is None:
            raise CheckpointFormatError("no such object or folder", path=self)
        if info.get("type") == "directory":
            return _Stat(0, stat.S_IFDIR | 0o755)
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
        stamp = getattr(mtime, "timestamp", None)
        ns = int(stamp() * 1e9) if stamp is not None else 0
        etag = info.get("ETag") or info.get("etag")
        return _Stat(int(info.get("size") or 0), stat.S_IFREG | 0o644, ns, etag=etag)

    lstat = stat

    def iterdir(self) -> Iterator[RemotePath]:
        for entry in self.store.listing(self.key):
            yield RemotePath(self.store, _key(self.store, entry["name"]))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """The entries of this folder whose names match ``pattern`` (one level)."""
        import fnmatch

        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """Every object under this folder whose name matches ``pattern``."""
        import fnmatch

        try:
            found = self.store.remember(
                self.store.call(self.key, self.store.fs.find, self.key, detail=True)
            )
        except FileNotFoundError:
            found = {}
        for name in sorted(found):
            key = _key(self.store, name)
            child = RemotePath(self.store, key)
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    def open(self) -> RemoteFile:
        """The object for reading by range; a folder or a missing object is refused as a
        local one is."""
        info = self._info()
        if info is None:
            raise CheckpointFormatError("no such object", path=self)
        if info.get("type") == "directory":
            raise CheckpointFormatError("is a folder, expected a checkpoint file", path=self)
        return RemoteFile(self.store, self.key, int(info.get("size") or 0))


#: Where a checkpoint is: a local path or an object behind a URL.
Location = Path | RemotePath


def request_timeout() -> float:
    """Seconds a request may wait to connect or for its next bytes:
    ``CKPTMIGRATE_REMOTE_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get("CKPTMIGRATE_REMOTE_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def _options(protocol: str) -> dict[str, Any]:
    """The file system's options that bound each request's wait (the protocols whose
    options we know; another protocol takes fsspec's defaults)."""
    timeout = request_timeout()
    if protocol in ("s3", "s3a"):
        retries = {"max_attempts": 3, "mode": "standard"}
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": retries,
                # botocore's default pool (10) would queue a scan's concurrent reads
                "max_pool_connections": MAX_CONNECTIONS,
            }
        }
    if protocol in ("http", "https"):
        import aiohttp

        wait = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return {"client_kwargs": {"timeout": wait}}
    return {}


def _missing(url: str, protocol: str, exc: BaseException) -> RemoteStorageError:
    """The error of a URL whose protocol's package is not installed, naming what installs it."""
    package, extra = _PACKAGES.get(protocol, (None, None))
    if package is not None:
        how = f"pip install 'ckptmigrate[{extra}]' (it installs fsspec and {package})"
    else:
        how = "install the fsspec implementation of that protocol"
    return RemoteStorageError(
        path_text(url), f"reading {protocol}:// URLs needs a package not installed ({exc}): {how}"
    )


def location(path: str | os.PathLike[str] | RemotePath) -> Location:
    """``path`` as the readers take it: a :class:`RemotePath` for a URL (``file://`` is a
    local path), else a :class:`~pathlib.Path`.

    >>> location("s3://bucket/ckpt/model.pth")  # doctest: +SKIP
    RemotePath('s3://bucket/ckpt/model.pth')
    """
    if isinstance(path, RemotePath):
        return path
    if not is_url(path):
        return Path(path)
    url = str(path)
    if _is_file_url(url):
        return Path(unquote(urlsplit(url).path))
    protocol = urlsplit(url).scheme.lower()
    try:
        import fsspec
        from fsspec.core import url_to_fs
        from fsspec.registry import get_filesystem_class
    except ImportError as exc:
        raise _missing(url, protocol, exc) from None
    try:
        get_filesystem_class(protocol)
        options = _options(protocol)
    except ImportError as exc:  # fsspec knows the protocol; its package is not installed
        raise _missing(url, protocol, exc) from None
    except ValueError:
        known = ", ".join(sorted(fsspec.available_protocols())[:12])
        raise RemoteStorageError(
            path_text(url),
            f"no fsspec file system reads {protocol}:// URLs (it knows {known}, ...)",
        ) from None
    try:
        fs, key = url_to_fs(url, **options)
    except Exception as exc:  # a malformed URL, or the protocol's own setup failing
        raise RemoteStorageError(path_text(url), failure_reason(exc)) from None
    if protocol in ("s3", "s3a") and getattr(fs, "retries", 1) > 1:
        fs.retries = 1  # botocore retries each request (3 attempts); s3fs would repeat those 5x
    key = key.rstrip("/")
    prefix = "" if protocol in ("http", "https") else protocol + "://"  # http keys: whole URLs
    return RemotePath(RemoteStore(fs, protocol, prefix), key)


@contextlib.contextmanager
def downloaded(target: RemotePath, files: list[Any]) -> Iterator[Path]:
    """``target`` copied into a private temporary folder (its ``files``, each streamed to
    disk), as the local path a full read takes; removed afterwards, also on an error or
    Ctrl-C.

    A full read needs every byte anyway; the readers that hand a path to torch or
    safetensors read that copy. An object whose key would land outside the copy (a ``..``
    part, an empty part) is refused before anything is fetched.
    """
    import shutil
    import tempfile

    folder = target.is_dir()
    root = target.key if folder else target.parent.key
    tmp = Path(tempfile.mkdtemp(prefix="ckptmigrate-remote-"))
    try:
        base = tmp / target.name if folder else tmp
        plan = []
        for f in files:
            rel = f.key[len(root) + 1 :] if f.key.startswith(root + "/") else ""
            parts = rel.split("/")
            if not rel or any(p in ("", ".", "..") or "\\" in p for p in parts):
                raise CheckpointFormatError(
                    f"the object {path_text(f)!r} is not a plain name under "
                    f"{path_text(target)}: refused, a copy of it could land outside its folder",
                    path=target,
                )
            plan.append((f, base.joinpath(*parts)))
        for f, dest in plan:
            dest.parent.mkdir(parents=True, exist_ok=True)
            target.store.requests += 1
            try:
                target.store.fs.get_file(f.key, str(dest))
            except FileNotFoundError:
                raise CheckpointFormatError("no such object", path=f) from None
            except Exception as exc:  # the protocol's own errors: botocore, aiohttp, ...
                raise RemoteStorageError(str(f), failure_reason(exc)) from None
            target.store.bytes_read += dest.stat().st_size
        yield base if folder else tmp / target.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
