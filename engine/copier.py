"""Copy disk files extent by extent, hashing with BLAKE3 on the way.

Work in progress: ``hash_file`` is a simple correct first version.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
from guestsafe.engine.errors import CopyError

CHUNK = 16 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyResult:
    size: int
    data_bytes: int
    blake3: str
    cloned: bool


_ZEROS = bytes(CHUNK)


def _hash_zeros(hasher: blake3.blake3, count: int) -> None:
    """Feed ``count`` zero bytes without allocating a hole-sized buffer."""
    view = memoryview(_ZEROS)
    while count > 0:
        step = min(count, CHUNK)
        hasher.update(view[:step])
        count -= step


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of each data extent."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def hash_file(
    path: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """BLAKE3 hex digest of ``path``, holes read as zeros (equals ``b3sum``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CopyError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        extents = list(_extents(fd, size))
        total = sum(length for _, length in extents)
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        done = pos = 0
        for start, length in extents:
            if start > pos:
                _hash_zeros(hasher, start - pos)
            end = start + length
            while start < end:
                if cancel is not None and cancel.is_set():
                    raise CopyError("copy cancelled")
                data = os.pread(fd, min(CHUNK, end - start), start)
                if not data:
                    raise CopyError(f"{path} shrank while being read")
                hasher.update(data)
                start += len(data)
                done += len(data)
                if progress is not None:
                    progress(done, total)
            pos = end
        if size > pos:
            _hash_zeros(hasher, size - pos)
        return str(hasher.hexdigest())
    except OSError as exc:
        raise CopyError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
