"""Where a writer's bytes go, and where the records it copies come from.

The byte-copying writers (:mod:`.torch.zip_writer`, :mod:`.safetensors_copy`) write a file
front to back: new bytes (a header, a new ``data.pkl``, a new tensor) and "copy ``count``
bytes of the source from ``offset`` here" (a record the plan kept). A :class:`Sink` takes
both:

- :class:`FileSink`: a local temporary file (``pwrite``, ``os.copy_file_range``), renamed over
  the target by :func:`~.atomic.atomic_fd` once complete: today's local behaviour.
- :class:`MultipartSink`: an S3 object. Written bytes fill one part buffer of
  :data:`PART_BYTES` at a time (``UploadPart``); a copied range of an object on the same
  store, :data:`MIN_PART_BYTES` or more, is copied by the server (``UploadPartCopy`` with
  ``CopySourceRange``), its bytes never downloaded; ``CompleteMultipartUpload`` makes the
  object appear, whole, under its name. A result smaller than one part is one ``PUT``. Any
  error, Ctrl-C included, aborts the upload (``AbortMultipartUpload``): a reader sees the old
  object or none, never a part of the new one. After a SIGKILL the pending upload stays
  (invisible to readers; a bucket lifecycle rule for incomplete uploads clears it).

A :class:`CopySource` is a local file (its descriptor), an object (ranged reads), or a local
private copy of an object (read locally, copied server-side when the sink is on its store).
:func:`open_copy` opens a writer's sink and its sources together, and checks the sources
unchanged before the result appears. Memory stays bounded: one part buffer, one read chunk.

>>> with open_sink(location("s3://models/new.pth")) as sink:  # doctest: +SKIP
...     sink.write(header)
...     sink.copy(source, 4096, 12 << 20)
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, RemoteWriteError
from . import atomic
from .atomic import Writeback, atomic_fd
from .byte_copy import copy_range
from .remote import Location, RemotePath, location, store_error

__all__ = [
    "MAX_COPY_PART_BYTES",
    "MIN_PART_BYTES",
    "PART_BYTES",
    "REMOTE_CRASH_EVENTS",
    "CopyJob",
    "CopySource",
    "FileSink",
    "MultipartSink",
    "Sink",
    "open_copy",
    "open_copy_source",
    "open_sink",
    "upload_file",
]

#: S3's least part size (every part but the last); also the least range copied server-side.
MIN_PART_BYTES = 5 << 20
#: How much written data one part holds: the sink's one buffer (tests set it to the minimum).
PART_BYTES = 16 << 20
#: S3's largest part (a longer copied range is several part copies).
MAX_COPY_PART_BYTES = 5 << 30
#: S3's most parts per upload.
MAX_PARTS = 10_000
#: A copied range that is read (not copied server-side) is read this much at a time.
READ_CHUNK = 8 << 20
#: The crash points (``CKPTMIGRATE_CRASH_AT``) of an upload: after each part is stored, and
#: right before the upload is completed.
REMOTE_CRASH_EVENTS = ("part", "complete")


@dataclass
class CopySource:
    """The file a writer copies kept records from: a local descriptor (``fd``), an object
    (``remote``, read by range), or both (a private local copy of ``remote``: read locally,
    copied server-side by a sink on its store). ``etag`` pins the object a server-side copy
    reads (``CopySourceIfMatch``): one changed since it was read is refused, not mixed in."""

    fd: int | None = None
    remote: RemotePath | None = None
    size: int = 0
    etag: str | None = None
    #: the local file's (size, mtime) when opened: a file written since is refused (not its
    #: ctime: a hard link to it, a backup or a kept shard, changes that)
    signature: tuple[int, int] | None = None

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` (fewer only at the end is an error: a source shorter
        than its records say)."""
        if self.fd is not None:
            chunks, got = [], 0
            while got < n:
                data = os.pread(self.fd, n - got, offset + got)
                if not data:
                    break
                chunks.append(data)
                got += len(data)
            out = b"".join(chunks)
        else:
            assert self.remote is not None
            store = self.remote.store
            out = store.pread(self.remote.key, offset, n, self.size)
        if len(out) != n:
            raise CheckpointFormatError(
                f"source ends {n - len(out)} bytes early while copying a member",
                path=self.remote if self.fd is None else None,
            )
        return out

    def check_unchanged(self) -> None:
        """Refuse (nothing appears) when the object read is no longer the one it was: its
        ETag changed while its records were read or copied (a server honours
        ``CopySourceIfMatch`` for the part copies too; this covers the ranged reads and the
        servers that do not). One HEAD request; a local file: one ``fstat``, its size and
        times as they were when it was opened."""
        if self.fd is not None and self.signature is not None:
            if _signature(self.fd) != self.signature:
                raise CheckpointFormatError(
                    "the file changed while its records were copied (another process wrote "
                    "it): nothing was written; run the upgrade again"
                )
        if self.remote is None or not self.etag:
            return
        store, key = self.remote.store, self.remote.key
        try:
            if store.protocol in ("s3", "s3a"):
                bucket, name, _ = store.fs.split_path(key)
                store.requests += 1
                now = store.fs.call_s3("head_object", Bucket=bucket, Key=name).get("ETag")
            else:
                now = store.call(key, store.fs.info, key).get("ETag")
        except Exception as exc:
            raise store_error(str(self.remote), exc, RemoteWriteError) from None
        if now is not None and now != self.etag:
            raise RemoteWriteError(
                str(self.remote),
                f"the object changed while it was copied (ETag {self.etag} when read, {now} "
                "now): nothing was written; run the upgrade again",
            )


class Sink(abc.ABC):
    """A file being written front to back: :meth:`write` new bytes, :meth:`copy` a range of a
    :class:`CopySource`. ``position`` is how many bytes it holds."""

    position: int = 0

    @abc.abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""

    @abc.abstractmethod
    def copy(self, source: CopySource, offset: int, count: int) -> int:
        """Append ``count`` bytes of ``source`` from ``offset``; returns how many of them went
        through Python (0 for a kernel or server-side copy)."""

    def copies_runs(self, source: CopySource) -> bool:
        """Whether ranges of ``source`` copied back to back are best copied as one run (a
        server-side copy: fewer, longer parts), so a writer copies whole source extents."""
        return False

    #: bytes of copied ranges that were read and uploaded, not copied by the server
    bytes_read_through: int = 0

    def settle(self) -> None:  # noqa: B027 (a hook: a sink that holds nothing back)
        """Send what is held back (a run of source bytes), so every source read is done."""

    def _write_from(self, source: CopySource, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``source`` from ``offset``, read a chunk at a time."""
        for at in range(0, count, READ_CHUNK):
            self.write(source.read(offset + at, min(READ_CHUNK, count - at)))


class FileSink(Sink):
    """A local file's descriptor (the temporary :func:`~.atomic.atomic_fd` renames into
    place), with the disk writing behind the copy (:class:`~.atomic.Writeback`)."""

    def __init__(self, fd: int, writeback: Writeback | None = None) -> None:
        self.fd, self.writeback, self.position = fd, writeback, 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            atomic.crash_point("write")  # looked up here: tests record it
            n = os.pwrite(self.fd, view, self.position)
            view = view[n:]
            self.position += n
        if self.writeback is not None:
            self.writeback.wrote(self.position)

    def copy(self, source: CopySource, offset: int, count: int) -> int:
        if source.fd is not None:
            through = copy_range(source.fd, offset, self.fd, self.position, count, self.writeback)
            self.position += count
            return through
        self._write_from(source, offset, count)  # an object: ranged reads
        return count


class MultipartSink(Sink):
    """An S3 object written as one multipart upload (or one PUT when it stays under a part);
    nothing is visible under its name before :meth:`commit`. Counts what it sent:
    ``requests``, ``bytes_uploaded`` (written and read-then-sent bytes) and
    ``bytes_copied_server_side``."""

    def __init__(
        self, target: RemotePath, part_bytes: int | None = None, if_match: str | None = None
    ) -> None:
        if target.store.protocol not in ("s3", "s3a"):
            raise RemoteWriteError(
                str(target),
                f"writing to {target.store.protocol}:// is not supported (S3 only): upgrade "
                "to a local file and upload it with the store's own tool",
            )
        self.target = target
        self.fs = target.store.fs
        self.bucket, self.key, _ = self.fs.split_path(target.key)
        if not self.key:
            raise RemoteWriteError(str(target), "a bucket is not an object name: add a key")
        self.part_bytes = max(MIN_PART_BYTES, part_bytes or PART_BYTES)
        self.position = 0
        self.buffer = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None
        self._run: tuple[CopySource, int, int] | None = None  # a source range held back
        self.bytes_read_through = 0
        #: the ETag the object under the name must still have when the result replaces it
        #: (an in-place upgrade: a concurrent writer's object is not overwritten)
        self.if_match = if_match
        self.requests = 0
        self.bytes_uploaded = 0
        self.bytes_copied_server_side = 0

    # -- the store's calls, their failures as one clear error ----------------------------

    def _call(self, method: str, **kwargs: Any) -> Any:
        self.requests += 1
        try:
            return self.fs.call_s3(method, **kwargs)
        except Exception as exc:  # botocore's errors, timeouts, refused connections
            raise store_error(str(self.target), exc, RemoteWriteError) from None

    def _start(self) -> None:
        if self.upload_id is None:
            found = self._call("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self.upload_id = found["UploadId"]

    def _part_number(self) -> int:
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            raise RemoteWriteError(
                str(self.target),
                f"the object needs more than {MAX_PARTS} parts: raise "
                "ckptmigrate.formats.sink.PART_BYTES",
            )
        return number

    def _send_part(self, method: str, **kwargs: Any) -> None:
        """Send the next part: ``upload_part`` (bytes) or ``upload_part_copy`` (a range the
        server copies)."""
        self._start()
        number = self._part_number()
        atomic.crash_point("write")
        done = self._call(
            method,
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            **kwargs,
        )
        etag = done["CopyPartResult"]["ETag"] if method == "upload_part_copy" else done["ETag"]
        self.parts.append({"PartNumber": number, "ETag": etag})
        atomic.crash_point("part")

    def _flush(self) -> None:
        """Upload the buffer as the next part."""
        if not self.buffer:
            return
        self._send_part("upload_part", Body=bytes(self.buffer))
        self.bytes_uploaded += len(self.buffer)
        self.buffer = bytearray()

    def _copy_part(self, source: CopySource, first: int, last: int) -> None:
        """The server copies ``[first, last)`` of the source object as the next part."""
        assert source.remote is not None
        copied = _copy_source(self.fs, source.remote, source.etag)
        self._send_part("upload_part_copy", CopySourceRange=f"bytes={first}-{last - 1}", **copied)
        self.bytes_copied_server_side += last - first

    # -- the sink ----------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if view:
            self._flush_run()
        while view:
            take = self.part_bytes - len(self.buffer)
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) >= self.part_bytes:
                self._flush()
        self.position = self._held()

    def _held(self) -> int:
        run = self._run[2] - self._run[1] if self._run is not None else 0
        return self.bytes_uploaded + self.bytes_copied_server_side + len(self.buffer) + run

    def copy(self, source: CopySource, offset: int, count: int) -> int:
        if count and self._server_side(source):
            # held back: a range that continues it joins it, and the run goes as few parts
            run = self._run
            if run is not None and run[0] is source and run[2] == offset:
                self._run = (source, run[1], offset + count)
            else:
                self._flush_run()
                self._run = (source, offset, offset + count)
            self.position = self._held()
            return 0
        self._flush_run()
        self._write_from(source, offset, count)
        return count

    def copies_runs(self, source: CopySource) -> bool:
        return self._server_side(source)

    def settle(self) -> None:
        self._flush_run()

    def _flush_run(self) -> None:
        """The held run of source bytes, copied by the server. Every part but the last holds
        MIN_PART_BYTES or more: a buffer of new bytes is first topped up from the run's head
        (read and uploaded); a run too short to make a part after that is read whole."""
        if self._run is None:
            return
        source, offset, end = self._run
        self._run = None
        count = end - offset
        need = max(0, MIN_PART_BYTES - len(self.buffer)) if self.buffer else 0
        if count - need < MIN_PART_BYTES:
            self._write_from(source, offset, count)
            self.bytes_read_through += count
            return
        if need:
            self.write(source.read(offset, need))
            self.bytes_read_through += need
            offset, count = offset + need, count - need
        self._flush()
        pieces = -(-count // MAX_COPY_PART_BYTES)
        step = -(-count // pieces)
        for at in range(0, count, step):
            self._copy_part(source, offset + at, offset + min(count, at + step))
        self.position = self._held()

    def _server_side(self, source: CopySource) -> bool:
        """Whether the source is an object the server can copy from: on the same store."""
        other = source.remote
        if other is None or other.store.protocol not in ("s3", "s3a"):
            return False
        fs = other.store.fs
        return fs is self.fs or (
            type(fs) is type(self.fs) and fs.storage_options == self.fs.storage_options
        )

    def commit(self) -> None:
        """Make the object appear under its name, whole: one PUT, or the upload completed."""
        self._flush_run()
        condition = {"IfMatch": self.if_match} if self.if_match else {}
        if self.upload_id is None:
            atomic.crash_point("complete")
            body = bytes(self.buffer)
            self._call("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
            self.bytes_uploaded += len(self.buffer)
            self.buffer = bytearray()
            return
        self._flush()  # the last part may be short
        atomic.crash_point("complete")
        self._call(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts},
            **condition,
        )
        self.upload_id = None

    def abort(self) -> None:
        """Drop the parts sent (nothing appears under the name); errors here are swallowed:
        the error that led here is the one to report."""
        self.buffer, self._run = bytearray(), None
        if self.upload_id is None:
            return
        upload, self.upload_id = self.upload_id, None
        with contextlib.suppress(Exception):
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload
            )


@contextlib.contextmanager
def open_sink(
    dst: str | os.PathLike[str] | RemotePath, source: CopySource | None = None
) -> Iterator[Sink]:
    """A sink writing ``dst``: a local file (temporary, renamed over ``dst`` on success) or an
    S3 object (a multipart upload completed on success); on any error, Ctrl-C included,
    nothing appears under the name. When ``dst`` is the object ``source`` copies from (in
    place), the result replaces it only while it is still that object (``IfMatch``)."""
    where = location(dst)
    if isinstance(where, RemotePath):
        same = source is not None and source.remote == where
        sink = MultipartSink(where, if_match=source.etag if same and source else None)
        try:
            yield sink
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        _forget(where)
        return
    with atomic_fd(where) as fd:
        yield FileSink(fd, Writeback(fd))


def _forget(target: RemotePath) -> None:
    """What the store learned of ``target`` before it was written is stale now."""
    store = target.store
    with store._lock:
        store._infos.pop(target.key, None)
        store._blocks = [b for b in store._blocks if b[0] != target.key]
    with contextlib.suppress(Exception):
        store.fs.invalidate_cache(target.key)


@contextlib.contextmanager
def open_copy_source(
    src: str | os.PathLike[str] | RemotePath, origin: RemotePath | None = None
) -> Iterator[CopySource]:
    """The file records are copied from: a local file (``origin``: the object it is a private
    copy of, for server-side copies), or an object, read by range."""
    from .detect import open_regular_file

    where = location(src)
    if isinstance(where, RemotePath):
        st = where.stat()
        yield CopySource(remote=where, size=st.st_size, etag=st.etag)
        return
    with open_regular_file(where) as f:
        signature = _signature(f.fileno())
        etag = origin.stat().etag if origin is not None else None
        yield CopySource(f.fileno(), origin, signature[0], etag, signature)


def _signature(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


class CopyJob:
    """A byte-copying writer's :attr:`sink` and the files it copies records from, each
    opened once (:meth:`source`) and open until the copy ends (:func:`open_copy`)."""

    sink: Sink

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self.opened: dict[Location, CopySource] = {}

    def source(
        self, src: str | os.PathLike[str] | RemotePath, origin: RemotePath | None = None
    ) -> CopySource:
        """The file ``src`` (``origin``: the object it is a private copy of), opened the
        first time it is asked for."""
        # asked once per copied range: a Path or an object is its own location already
        where = src if isinstance(src, (Path, RemotePath)) else location(src)
        if where not in self.opened:
            self.opened[where] = self._stack.enter_context(open_copy_source(where, origin))
        return self.opened[where]


@contextlib.contextmanager
def open_copy(
    dst: str | os.PathLike[str] | RemotePath,
    sources: Iterable[tuple[str | os.PathLike[str] | RemotePath, RemotePath | None]] = (),
) -> Iterator[CopyJob]:
    """A sink writing ``dst`` (:func:`open_sink`) and the files records are copied into it
    from: ``sources`` (``(file, origin)`` pairs) opened first, so that in place the one
    that is ``dst``'s object guards the swap (its ETag), others when first asked for. On
    success the sink settles and every source is checked unchanged before the result
    appears; on any error nothing does.

    >>> with open_copy("new.pth", [("old.pth", None)]) as job:  # doctest: +SKIP
    ...     job.sink.copy(job.source("old.pth"), 0, 4096)
    """
    with contextlib.ExitStack() as stack:
        job = CopyJob(stack)
        for src, origin in sources:
            job.source(src, origin)
        target = location(dst)
        replaced = next((s for s in job.opened.values() if s.remote == target), None)
        job.sink = stack.enter_context(open_sink(target, replaced))
        yield job
        job.sink.settle()
        for source in job.opened.values():
            source.check_unchanged()  # before the new file or object appears


def upload_file(local: Path, dst: RemotePath) -> int:
    """Put the local file ``local`` at ``dst`` through a :class:`MultipartSink` (one part
    buffer in memory); the object appears only once complete. Returns its size."""
    with open_copy_source(local) as source, open_sink(dst) as sink:
        sink.copy(source, 0, source.size)
    return source.size


def copy_object(src: RemotePath, dst: RemotePath) -> None:
    """Copy the object ``src`` to ``dst`` on the server (``CopyObject``, or part copies of a
    multipart upload past 5 GiB): no byte is downloaded; ``dst`` appears whole or not at all,
    and only while ``src`` is still the object that was asked for (its ETag)."""
    st = src.stat()
    if st.st_size > MAX_COPY_PART_BYTES:
        with open_copy_source(src) as source, open_sink(dst) as sink:
            sink.copy(source, 0, source.size)
        return
    sink = MultipartSink(dst)
    copied = _copy_source(sink.fs, src, st.etag)
    atomic.crash_point("complete")
    sink._call("copy_object", Bucket=sink.bucket, Key=sink.key, **copied)
    _forget(dst)


def _copy_source(fs: Any, src: RemotePath, etag: str | None) -> dict[str, Any]:
    """The arguments of a server-side copy that name ``src`` (its version, if the key has
    one) and, given its ``etag``, refuse it once it changed since it was read."""
    bucket, key, version = fs.split_path(src.key)
    where: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version:
        where["VersionId"] = version
    return {"CopySource": where, **({"CopySourceIfMatch": etag} if etag else {})}


def same_object_bytes(a: RemotePath, b: RemotePath) -> bool:
    """Whether two objects hold the same bytes: equal sizes, and equal ETags or (an ETag of a
    multipart upload is not its bytes' digest) equal bytes, read a chunk at a time."""
    sa, sb = a.stat(), b.stat()
    if sa.st_size != sb.st_size:
        return False
    if sa.etag and sa.etag == sb.etag:
        return True
    with open_copy_source(a) as ra, open_copy_source(b) as rb:
        for at in range(0, sa.st_size, READ_CHUNK):
            n = min(READ_CHUNK, sa.st_size - at)
            if ra.read(at, n) != rb.read(at, n):
                return False
    return True
