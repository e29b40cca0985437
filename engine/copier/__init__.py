"""Copy disk files extent by extent, hashing with BLAKE3 on the way.

Only data extents (SEEK_DATA/SEEK_HOLE) are written: holes stay holes. The
hasher feeds zeros for the holes, so the digest equals ``b3sum``; the same
stream, cut at every 4 MiB, gives the chunk table of archive format 3. I/O is
O_DIRECT where the kernel accepts it, and memory stays constant whatever the
size of the disk. The modules, from the ground up:

- ``extents``: the SEEK_DATA walk, and how extents are packed into buffers;
- ``hashing``: BLAKE3 of zeros for free, and the chunk table (``ChunkTable``);
- ``files``: the source read and the file or device written (O_DIRECT, page cache);
- ``pipeline``: reader, writer, hasher and chunk-table threads over one buffer pool;
- ``filecopy``: ``copy_file``, ``hash_file`` and ``hash_with_chunks``;
- ``device``: ``copy_to_device``, a file written onto a block device and read back.

Everything the rest of the engine uses is importable from here. The private names
below are shared with the remote volume streams (``hypervisor.volume_streams``),
which write the same kind of file through the same page-cache handling.
"""

from guestsafe.engine.copier.device import copy_to_device
from guestsafe.engine.copier.extents import ALIGN, CHUNK, MiB, _extents, _raw_extents, data_ranges
from guestsafe.engine.copier.filecopy import (
    CopyResult,
    HashResult,
    copy_file,
    hash_file,
    hash_with_chunks,
)
from guestsafe.engine.copier.files import (
    _SFR_WAIT_AFTER,
    _SFR_WAIT_BEFORE,
    _SFR_WRITE,
    O_DIRECT,
    _create_dest,
    _drop_cache,
    _pwrite_all,
    _sync_file_range,
    _write_error,
    device_size,
)
from guestsafe.engine.copier.hashing import (
    HOLE,
    TABLE_CHUNK,
    ChunkTable,
    KnownFile,
    _ChunkHasher,
    _hash_zeros,
    zero_digest,
)
from guestsafe.engine.copier.pipeline import Pacer, ProgressFn

__all__ = [
    "ALIGN",
    "CHUNK",
    "HOLE",
    "O_DIRECT",
    "TABLE_CHUNK",
    "_SFR_WAIT_AFTER",
    "_SFR_WAIT_BEFORE",
    "_SFR_WRITE",
    "ChunkTable",
    "CopyResult",
    "HashResult",
    "KnownFile",
    "MiB",
    "Pacer",
    "ProgressFn",
    "_ChunkHasher",
    "_create_dest",
    "_drop_cache",
    "_extents",
    "_hash_zeros",
    "_pwrite_all",
    "_raw_extents",
    "_sync_file_range",
    "_write_error",
    "copy_file",
    "copy_to_device",
    "data_ranges",
    "device_size",
    "hash_file",
    "hash_with_chunks",
    "zero_digest",
]
