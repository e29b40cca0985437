"""A storage volume streamed over libvirt's connection, sparse, hashed on the way.

Download (a remote guest's disk into the archive): ``virStorageVolDownload``
with the sparse-stream flag sends data packets and hole records, never the
zeros of a hole. ``SparseSink`` writes each data packet at its offset, skips
each hole (the file stays sparse), and hashes both in order, holes as zeros,
so the digest equals the local copier's and ``b3sum``'s.

Upload (a version restored into a volume on a remote host): the archive file's
data extents are sent as data and its holes with ``sendHole``, hashed the same
way, and the digest must match the manifest before the guest is defined.

Memory stays at ``QUEUED`` packets plus the page cache the copier's own throttle
allows (two ``FLUSH`` ranges), whatever the volume's size.

A job's ``bwlimit`` paces both directions (the receiving thread waits, so
libvirt's flow control holds the sending host back too); its ``ionice`` class
applies to the archive's side only, the writes here: the volume is read on the
other host by libvirtd, in libvirtd's class.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import blake3
import libvirt

from guestsafe.engine import failpoints
from guestsafe.engine.copier import (
    _SFR_WAIT_AFTER,
    _SFR_WAIT_BEFORE,
    _SFR_WRITE,
    CopyResult,
    Pacer,
    ProgressFn,
    _ChunkHasher,
    _create_dest,
    _drop_cache,
    _extents,
    _hash_zeros,
    _pwrite_all,
    _sync_file_range,
    _write_error,
)
from guestsafe.engine.errors import Cancelled, CopyError
from guestsafe.engine.fsutil import fsync_dir

MiB = 1024 * 1024
# libvirt's stream packets carry at most 256 KiB, and one receive returns one
# packet whatever the buffer (measured over qemu+ssh://: 9006 receives for 1 GiB
# with 256 KiB, 1 MiB or 4 MiB asked). The bindings allocate the whole buffer on
# every call, so asking for more only costs: 4 MiB doubled the receiver's CPU.
PACKET = 256 * 1024
# What an upload hands libvirt at once (it cuts it into packets itself).
SEND = 1 * MiB
# Written data is pushed to disk and dropped from the page cache in ranges of this.
FLUSH = 16 * MiB
# Tests arm it (failpoints.py): after each FLUSH range received.
STREAM_FAILPOINT = "stream.chunk"


class SparseSink:
    """Writes a sparse stream into a new file: data at its offset, holes left as holes."""

    def __init__(self, fd: int, size: int | None = None) -> None:
        self.fd = fd
        self.offset = 0  # bytes of the stream so far, holes included
        self.data_bytes = 0
        self.hasher = blake3.blake3()
        # The chunk table (format 3) of a stream whose length is known, as the
        # local copier makes it: the same chunks, the same digests, holes named.
        self.chunker = _ChunkHasher(size) if size else None
        self._unflushed = 0  # start of the range not yet handed to writeback
        self._pending: tuple[int, int] | None = None  # range being written back

    def data(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        _pwrite_all(self.fd, view, self.offset)
        self.hasher.update(view)
        if self.chunker is not None:
            self.chunker.data(view)
        self.offset += len(chunk)
        self.data_bytes += len(chunk)
        if self.offset - self._unflushed >= FLUSH:
            self._flush()

    def hole(self, length: int) -> None:
        if length < 0:
            raise CopyError(f"the stream sent a hole of {length} bytes")
        _hash_zeros(self.hasher, length)
        if self.chunker is not None:
            self.chunker.zeros(length)
        self._flush()
        self.offset += length
        self._unflushed = self.offset

    def _flush(self) -> None:
        """Keep two ranges dirty at most, as the copier does (``_Dest._throttle``)."""
        length = self.offset - self._unflushed
        if length <= 0:
            return
        _sync_file_range(self.fd, self._unflushed, length, _SFR_WRITE)
        if self._pending is not None:
            flags = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
            _sync_file_range(self.fd, *self._pending, flags)
            _drop_cache(self.fd, *self._pending)
        self._pending = (self._unflushed, length)
        self._unflushed = self.offset
        failpoints.hit(STREAM_FAILPOINT)

    def finish(self) -> str:
        """The file at its full length (a trailing hole too), fsynced; its BLAKE3."""
        if self.chunker is not None and self.chunker.size != self.offset:
            self.chunker = None  # a stream of the wrong length is refused by the caller
        os.ftruncate(self.fd, self.offset)
        os.fsync(self.fd)
        _drop_cache(self.fd)
        return str(self.hasher.hexdigest())


def receive(
    stream: libvirt.virStream,
    sink: SparseSink,
    *,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
) -> None:
    """Read the whole sparse stream into ``sink`` (``recvFlags`` stopping at holes).

    The network and the disk overlap: this thread receives, a writer thread
    writes and hashes, with at most ``QUEUED`` packets between them. ``pace``:
    the job's rate cap, taken here so the stream itself slows down, and its I/O
    class, for the writer's local writes.
    """
    writer = _Writer(sink, pace)
    stop = cancel if cancel is not None else threading.Event()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("copy cancelled")
            writer.check()
            got = stream.recvFlags(PACKET, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
            if got == -3:  # a hole is next in the stream
                writer.put(int(stream.recvHole(0)))
            elif isinstance(got, int):
                raise CopyError(f"the stream answered {got} to a blocking receive")
            elif not got:
                break  # the end of the volume
            else:
                writer.put(got)
                if pace is not None:
                    pace.wrote(len(got), stop)
            if progress is not None:
                progress(writer.received)
    finally:
        writer.close()


# Packets received and not yet written (libvirt sends 256 KiB ones): about one FLUSH
# range, so the writer's wait for writeback does not stall the network. Memory stays
# at QUEUED packets whatever the volume's size.
QUEUED = 64


class _Writer:
    """The sink's writes and hashing, on their own thread, fed through a bounded queue."""

    def __init__(self, sink: SparseSink, pace: Pacer | None = None) -> None:
        self.sink = sink
        self._pace = pace
        self.received = 0  # data bytes handed over
        self.error: BaseException | None = None
        self._queue: queue.Queue[bytes | int | None] = queue.Queue(QUEUED)
        self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self._thread.start()

    def put(self, item: bytes | int) -> None:
        if isinstance(item, bytes):
            self.received += len(item)
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        if self._pace is not None:
            self._pace.thread_started()  # the job's I/O class for the archive's writes
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, int):
                    self.sink.hole(item)
                else:
                    self.sink.data(item)
        except BaseException as exc:
            self.error = exc
            while self._queue.get() is not None:  # drain, so close() never blocks
                pass

    def close(self) -> None:
        """Wait until everything queued is written; raise what the writer raised."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self.check()


def download_volume(
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    dst: Path,
    *,
    length: int,
    total: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
) -> CopyResult:
    """Stream ``vol`` into the new file ``dst`` (0600), holes kept, hashed, fsynced.

    ``length``: the volume's size (the stream must end there); ``total``: the
    bytes expected to cross the wire, for progress (its allocation); ``pace``:
    the job's ``bwlimit`` and I/O class. The result carries the chunk table. Raises
    CopyError, with ``dst`` removed, on any failure, a lost connection included.
    """
    fd = _create_dest(dst)
    stream = conn.newStream(0)
    try:
        sink = SparseSink(fd, length)
        try:
            vol.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
            receive(stream, sink, progress=_progress_of(progress, total), cancel=cancel, pace=pace)
            stream.finish()
            digest = sink.finish()
        except libvirt.libvirtError as exc:
            raise CopyError(
                f"streaming volume {vol.name()} from {_uri(conn)} failed: {_message(exc)} "
                "(the connection may have dropped); the copy was discarded"
            ) from exc
        except OSError as exc:
            raise _write_error(exc, dst, max(total - sink.data_bytes, 0), total) from exc
        if sink.offset != length:
            raise CopyError(
                f"volume {vol.name()} streamed {sink.offset} bytes, but it holds {length}; "
                "it changed during the copy, and the copy was discarded"
            )
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise
    os.close(fd)
    fsync_dir(dst.parent)
    if progress is not None:
        progress(total, total)
    chunks = sink.chunker.table() if sink.chunker is not None else None
    return CopyResult(length, sink.data_bytes, digest, False, chunks)


def _progress_of(progress: ProgressFn | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(min(done, total), total)


def upload_volume(
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    src: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
) -> str:
    """Send the file ``src`` into ``vol``, its holes as holes; the BLAKE3 of what was sent.

    ``pace``: at most its rate is sent (its I/O class is not set: this is the
    caller's thread, which keeps the default class).
    """
    stream = conn.newStream(0)
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CopyError(f"cannot read {src}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        vol.upload(stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        digest = _send_file(stream, fd, size, progress, cancel, pace)
        stream.finish()
        return digest
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise CopyError(
            f"uploading {src} into volume {vol.name()} on {_uri(conn)} failed: {_message(exc)}"
        ) from exc
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    finally:
        _drop_cache(fd)
        os.close(fd)


def _send_file(
    stream: libvirt.virStream,
    fd: int,
    size: int,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    pace: Pacer | None = None,
) -> str:
    hasher = blake3.blake3()
    stop = cancel if cancel is not None else threading.Event()
    total = sum(end - start for start, end in _extents(fd, size))
    done = pos = 0
    for start, end in _extents(fd, size):
        if start > pos:
            stream.sendHole(start - pos, 0)
            _hash_zeros(hasher, start - pos)
        pos = start
        while pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("restore cancelled")
            chunk = os.pread(fd, min(SEND, end - pos), pos)
            if not chunk:
                raise CopyError(f"file shrank while being uploaded (at byte {pos})")
            stream.send(chunk)
            if pace is not None:
                pace.wrote(len(chunk), stop)
            hasher.update(chunk)
            pos += len(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
            if done % FLUSH < len(chunk):
                _drop_cache(fd, 0, pos)
    if size > pos:
        stream.sendHole(size - pos, 0)
        _hash_zeros(hasher, size - pos)
    return str(hasher.hexdigest())


def _uri(conn: libvirt.virConnect) -> str:
    try:
        return str(conn.getURI())
    except libvirt.libvirtError:
        return "the remote host"


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()
