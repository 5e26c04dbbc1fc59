"""A file named by URL or path, on local disk with the sha256 it must have.

Named weights (:mod:`ckptmigrate.schema.weights`) are fetched through here: a local path or
``file://`` URL is read where it lies; an ``http://`` or ``https://`` URL, or an object store's
(``s3://``, ``gs://``: any fsspec URL, with ``ckptmigrate[remote]``), is downloaded once
into a cache folder (torch.hub's ``<hub dir>/checkpoints``, chosen by the caller) and read from
there after. Every use hashes the whole file, cached or not, and refuses a mismatch: a cache
that a crash, a full disk or a person changed is downloaded again, never trusted.

A download streams in chunks into a temporary beside its final name, hashing as it goes, and
appears under that name (``os.replace``) only once the hash is right, so a reader never sees a
partial file and a killed download leaves only a ``*.partial`` temporary, which the next
download of the same name removes. Each read of the socket waits at most ``timeout`` seconds,
and a body longer than ``max_bytes`` (or than its own Content-Length) is cut off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from ..errors import PathNotFoundError, WeightsDownloadError, WeightsHashMismatchError

__all__ = ["CHUNK", "PARTIAL_SUFFIX", "file_name_of", "fetch_verified", "is_download", "sha256_of"]

#: Read and hash in pieces of this size: memory stays flat whatever the file's size.
CHUNK = 1 << 20

#: A download in progress (or killed mid-way) is ``<name>.<pid>.partial`` beside its name.
PARTIAL_SUFFIX = ".partial"


def is_download(url: str) -> bool:
    """Whether ``url`` is fetched over the network (``http://``, ``https://``)."""
    return urlsplit(url).scheme.lower() in ("http", "https")


def file_name_of(url: str) -> str:
    """The last part of a URL's path, as torch.hub names its cached files.

    >>> file_name_of("https://example.com/w/tinyconv-3f2a.pth?sig=x")
    'tinyconv-3f2a.pth'
    """
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "\x00" in name or os.sep in name:
        raise WeightsDownloadError(url, "its path ends in no file name to cache it under")
    return name


def _local_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise WeightsDownloadError(url, f"file:// URLs on another host ({parts.netloc})")
        return Path(unquote(parts.path))
    return Path(url).expanduser()


def sha256_of(stream: BinaryIO) -> str:
    """The hex sha256 of what ``stream`` holds from where it stands to its end."""
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def fetch_verified(
    url: str,
    sha256: str,
    cache: Path,
    *,
    timeout: float = 60.0,
    max_bytes: int | None = None,
) -> Path:
    """The local file ``url`` names, with its sha256 checked to be ``sha256``.

    A path or ``file://`` URL is hashed where it lies. An ``http(s)://`` URL is served from
    ``cache / file_name_of(url)`` when that file hashes right, and downloaded there otherwise.

    >>> fetch_verified("https://example.com/w/a-3f2a.pth", "3f2a...", Path("~/.cache/..."))
    PosixPath('/home/me/.cache/torch/hub/checkpoints/a-3f2a.pth')
    """
    want = sha256.lower()
    scheme = urlsplit(url).scheme.lower()
    remote = scheme not in ("", "file", "http", "https") and len(scheme) > 1  # "C:": a drive
    if not is_download(url) and not remote:
        path = _local_path(url)
        if not path.is_file():
            raise PathNotFoundError(path, "weights file", "the file the named weights point to")
        got = _hash_file(path)
        if got != want:
            raise WeightsHashMismatchError(url, want, got, path=path)
        return path
    target = cache / file_name_of(url)
    if target.is_file() and _hash_file(target) == want:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.with_name(f"{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        fetch = _copy_object if remote else _download
        got = fetch(url, partial, timeout=timeout, max_bytes=max_bytes)
        if got != want:
            raise WeightsHashMismatchError(url, want, got)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def _remove_stale_partials(target: Path) -> None:
    """Temporaries of downloads of ``target`` that a kill left behind."""
    for stale in target.parent.glob(f"{target.name}.*{PARTIAL_SUFFIX}"):
        try:
            stale.unlink()
        except OSError:  # another process's download, finishing as we look
            pass


def _copy_object(url: str, partial: Path, *, timeout: float, max_bytes: int | None) -> str:
    """Stream the object at an fsspec URL (``s3://``, ``gs://``...) into ``partial`` (fsynced)
    by ranged reads; return its sha256. Credentials come from the protocol's own chain; each
    request waits as the remote readers' do (``CKPTMIGRATE_REMOTE_TIMEOUT``), not ``timeout``."""
    from ..errors import CheckpointFormatError, RemoteStorageError
    from ..formats.remote import RemotePath, location

    try:
        target = location(url)
        if not isinstance(target, RemotePath):  # pragma: no cover - file:// is read in place
            raise WeightsDownloadError(url, "not an object store URL")
        size = target.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise WeightsDownloadError(
                url, f"it is {size} bytes, more than the {max_bytes} allowed"
            )
        digest = hashlib.sha256()
        with target.open() as source, open(partial, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except RemoteStorageError as exc:
        raise WeightsDownloadError(url, exc.reason) from None
    except CheckpointFormatError:  # the store answered: no such object
        raise WeightsDownloadError(url, "no such object in its store") from None
    return digest.hexdigest()


def _download(url: str, partial: Path, *, timeout: float, max_bytes: int | None) -> str:
    """Stream ``url`` into ``partial`` (fsynced); return the sha256 of what arrived."""
    import http.client
    import urllib.error
    import urllib.request

    from ..base.version import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"ckptmigrate/{__version__}"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            limit = max_bytes
            if declared is not None and declared.isdigit():
                if max_bytes is not None and int(declared) > max_bytes:
                    raise WeightsDownloadError(
                        url, f"it is {declared} bytes, more than the {max_bytes} allowed"
                    )
                limit = int(declared) if limit is None else min(limit, int(declared))
            received = 0
            with open(partial, "wb") as out:
                while chunk := response.read1(CHUNK):  # what has arrived, as it arrives
                    received += len(chunk)
                    if limit is not None and received > limit:
                        raise WeightsDownloadError(
                            url, f"the server sent more than the {limit} bytes it may"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if declared is not None and declared.isdigit() and received < int(declared):
                raise WeightsDownloadError(
                    url, f"the connection closed after {received} of {declared} bytes"
                )
    except WeightsDownloadError:
        raise
    except urllib.error.HTTPError as exc:
        raise WeightsDownloadError(url, f"the server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise WeightsDownloadError(url, str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:  # a read past ``timeout``, a reset
        raise WeightsDownloadError(url, f"{type(exc).__name__}: {exc}") from None
    return digest.hexdigest()
