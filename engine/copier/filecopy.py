"""Copy a disk file to a new file, or hash one: the copier's entry points for files.

Only data extents are written: holes stay holes. A whole-file reflink clone
(FICLONE) is tried first where the source is a file; the data is then only read
and hashed. Everything is fsynced before the call returns.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.copier.files import (
    _create_dest,
    _Dest,
    _open_source,
    _resized_error,
    _Shrank,
    _Source,
    _try_clone,
    _write_error,
)
from guestsafe.engine.copier.hashing import ChunkTable, KnownFile
from guestsafe.engine.copier.pipeline import (
    Pacer,
    ProgressFn,
    _Cancelled,
    _copy_error,
    _Pipeline,
)
from guestsafe.engine.errors import Cancelled, CopyError
from guestsafe.engine.fsutil import fsync_dir


@dataclass(frozen=True)
class CopyResult:
    size: int
    data_bytes: int
    blake3: str
    cloned: bool
    chunks: ChunkTable | None = None


@dataclass(frozen=True)
class HashResult:
    blake3: str
    chunks: ChunkTable | None
    data_bytes: int = 0  # the bytes read: the file's data extents
    reused: bool = False  # every chunk matched the ``known`` file's: its digest reused


def copy_file(
    src: Path,
    dst: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
    chunk_table: bool = True,
) -> CopyResult:
    """Copy ``src`` to the new file ``dst`` (0600), holes kept, hashed, fsynced.

    Raises CopyError, with ``dst`` removed, on any failure; Cancelled (a
    CopyError) when ``cancel`` is set. ``pace``: the I/O class and rate cap.
    ``chunk_table``: also hash every chunk (``CopyResult.chunks``); a restore,
    which only checks the whole-file digest, saves that work with False.
    """
    source = _open_source(src)
    try:
        fd = _create_dest(dst)
        try:
            return _copy_into(source, dst, fd, progress, cancel, pace, chunk_table)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
    finally:
        source.close()


def _copy_into(
    source: _Source,
    dst: Path,
    fd: int,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    pace: Pacer | None = None,
    chunk_table: bool = True,
) -> CopyResult:
    total = source.data_bytes
    try:
        # A device cannot be reflinked into a file; its zeros are skipped instead.
        cloned = source.size > 0 and not source.block and _try_clone(fd, source.fd)
        if not cloned:
            os.ftruncate(fd, source.size)
    except OSError as exc:
        os.close(fd)
        raise _write_error(exc, dst, total, total) from exc
    dest = _Dest(dst, fd, skip_zeros=source.block)
    try:
        pipe = _Pipeline(source, None if cloned else dest, cancel, pace, chunk_table)
        pipe.run(total, progress)
        if pipe.error is not None:
            raise _copy_error(pipe, source.path, dst, total) from pipe.error
        resized = source.changed_size()
        if resized is not None:
            raise _resized_error(source.path, source.size, resized)
        try:
            dest.finish()
        except OSError as exc:
            # Space runs out at fsync when the filesystem allocates late: all of
            # it is still needed, since the partial copy is removed.
            raise _write_error(exc, dst, total, total) from exc
    finally:
        dest.close()
    fsync_dir(dst.parent)
    table = pipe.chunker.table() if pipe.chunker is not None else None
    return CopyResult(source.size, total, pipe.digest, cloned, table)


def hash_file(
    path: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    limit: int | None = None,
) -> str:
    """BLAKE3 hex digest of ``path``, holes read as zeros (equals ``b3sum``).

    A cold read-back: O_DIRECT where possible, so it checks the disk, not RAM.
    Only data extents are read. ``limit``: only the first bytes (of a device).
    """
    return _hash(path, progress, cancel, limit, chunk_table=False).blake3


def hash_with_chunks(
    path: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
    known: KnownFile | None = None,
) -> HashResult:
    """``hash_file``, and the file's chunk table from the same read.

    ``pace``: a job's I/O class and rate, where the read is a backup's (shared_copy).
    ``known``: a file ``path`` may equal (the previous version of the disk); while
    its chunks match, the whole file is not hashed, and if all match, its digest is
    ``known``'s (``HashResult.reused``).
    """
    return _hash(path, progress, cancel, None, chunk_table=True, pace=pace, known=known)


def _hash(
    path: Path,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    limit: int | None,
    *,
    chunk_table: bool,
    pace: Pacer | None = None,
    known: KnownFile | None = None,
) -> HashResult:
    source = _open_source(path, limit)
    try:
        pipe = _Pipeline(source, None, cancel, pace, chunk_table=chunk_table, known=known)
        pipe.run(source.data_bytes, progress)
    finally:
        source.close()
    if isinstance(pipe.error, _Cancelled):
        raise Cancelled("verify cancelled") from None
    if isinstance(pipe.error, _Shrank):
        raise CopyError(f"{path} shrank while being read") from None
    if isinstance(pipe.error, OSError):
        raise CopyError(f"cannot read {path}: {pipe.error.strerror}") from pipe.error
    if pipe.error is not None:
        raise CopyError(f"reading {path} failed: {pipe.error}") from pipe.error
    table = pipe.chunker.table() if pipe.chunker is not None else None
    return HashResult(pipe.digest, table, source.data_bytes, pipe.reused)
