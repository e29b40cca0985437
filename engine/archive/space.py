"""Space, shown honestly: what each version holds alone, and what the archive takes in all.

Versions that are reflink clones of each other share the blocks that did not change,
so a version's allocated size (``st_blocks``) overstates what deleting it would free,
and adding up the sizes overstates what the archive takes on the device. FIEMAP says,
per extent of a file, where on the device it lies and whether another file shares it
(``FIEMAP_EXTENT_SHARED``):

- a version's *unique* size is the length of its files' extents that no other file
  shares: about what deleting the version frees;
- the archive's *total* is the union of the physical ranges of every listed file, each
  block counted once however many versions share it: what the versions take on the
  device.

Where FIEMAP does not work (tmpfs, some FUSE filesystems), every allocated block is
counted as unique and the total is the sum of the sizes: without reflink that is exact.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.errors import naming

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap), from linux/fs.h

EXTENT_LAST = 0x1
# Extents with no settled place on the device yet (delayed allocation) or data kept
# inside metadata: their physical address means nothing, so they are never merged.
_NO_ADDRESS = 0x2 | 0x4 | 0x200 | 0x400  # UNKNOWN, DELALLOC, DATA_INLINE, DATA_TAIL
EXTENT_SHARED = 0x2000

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, fe_flags
_BATCH = 512  # extents asked for per ioctl: 28 KiB of buffer, whatever the file's size
_NO_FIEMAP = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL)


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & EXTENT_SHARED)

    @property
    def placed(self) -> bool:
        """Whether ``physical`` is a real device address (and can be merged with others)."""
        return not self.flags & _NO_ADDRESS


def extents(fd: int) -> Iterator[Extent]:
    """The file's extents in logical order; OSError (ENOTTY, EOPNOTSUPP) without FIEMAP."""
    start = 0
    while True:
        request = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(request, 0, start, 2**64 - 1 - start, 0, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = _HEADER.unpack_from(request, 0)[3]
        if mapped == 0:
            return
        for index in range(mapped):
            logical, physical, length, flags = _EXTENT.unpack_from(
                request, _HEADER.size + index * _EXTENT.size
            )
            yield Extent(logical, physical, length, flags)
            if flags & EXTENT_LAST:
                return
            start = logical + length


@dataclass(frozen=True)
class ArchiveSpace:
    """The space of a set of version folders.

    ``unique`` maps each folder to the bytes of its files that no other file shares;
    ``total`` is what all the folders take on the device, shared blocks counted once.
    """

    unique: dict[Path, int]
    total: int


def space_of(folders: Iterable[Path]) -> ArchiveSpace:
    """Unique bytes per version folder and the folders' total on the device."""
    unique: dict[Path, int] = {}
    ranges: list[tuple[int, int]] = []  # (physical start, end) of every placed extent
    unplaced = 0  # bytes with no device address, or of files FIEMAP cannot map
    for folder in folders:
        alone = 0
        for path in _regular_files(folder):
            with naming("mapping the extents of", path):
                file_unique, file_unplaced = _map_file(path, ranges)
            alone += file_unique
            unplaced += file_unplaced
        unique[folder] = alone
    return ArchiveSpace(unique=unique, total=unplaced + _union_length(ranges))


def unique_bytes(path: Path) -> int:
    """The bytes of one file that no other file shares (all it allocates without FIEMAP)."""
    with naming("mapping the extents of", path):
        return _map_file(path, [])[0]


def _map_file(path: Path, ranges: list[tuple[int, int]]) -> tuple[int, int]:
    """(unique bytes, bytes not in ``ranges``) of one file; its placed extents join ``ranges``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        unique = unplaced = 0
        try:
            for extent in extents(fd):
                if not extent.shared:
                    unique += extent.length
                if extent.placed:
                    ranges.append((extent.physical, extent.physical + extent.length))
                else:
                    unplaced += extent.length
        except OSError as exc:
            if exc.errno not in _NO_FIEMAP:
                raise
            # No FIEMAP, so no reflink either: every allocated block is this file's alone.
            allocated = os.fstat(fd).st_blocks * 512
            return allocated, allocated
        return unique, unplaced
    finally:
        os.close(fd)


def _regular_files(folder: Path) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                yield Path(entry.path)


def _union_length(ranges: list[tuple[int, int]]) -> int:
    """The bytes the half-open ranges cover, overlaps counted once."""
    total = 0
    end = -1
    for start, stop in sorted(ranges):
        if start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
