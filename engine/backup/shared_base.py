"""The previous version a new disk copy may share its unchanged chunks with (issue 13).

A base is the newest committed version of the guest that counts as good (its
manifest reads, no verification failed: ``retention.is_good``) and holds a file
for the same disk target, of the same format and virtual size, with a chunk table
whose digest matches the manifest. Anything less, and the disk is copied in full.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.archive.chunks import TableError, chunk_count, file_digest, read_entries
from guestsafe.engine.archive.layout import version_numbers
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.reflink import supports_reflink
from guestsafe.engine.archive.retention import is_good
from guestsafe.engine.archive.versions import read_version
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.backup.shared_copy import SharedResult, shared_copy
from guestsafe.engine.copier import TABLE_CHUNK, ChunkTable, Pacer
from guestsafe.engine.errors import ArchiveError, CopyError, naming
from guestsafe.engine.hypervisor import disk_files
from guestsafe.engine.sizes import byte_size


@dataclass(frozen=True)
class SharedBase:
    """The previous version's file of one disk, its chunk table and whole-file digest."""

    number: int
    file: Path
    table: ChunkTable
    blake3: str


def find_base(
    guest_dir: Path, guest: str, below: int, target: str, fmt: str, virtual_size: int
) -> SharedBase | None:
    """The base for disk ``target`` of a new version numbered ``below``, or None."""
    for number in reversed(version_numbers(guest_dir)):
        if number >= below:
            continue
        folder = guest_dir / str(number)
        if not is_good(folder, guest):
            continue
        try:
            version = read_version(guest, folder)
        except ArchiveError:
            continue
        record = next((r for r in version.manifest.disks if r.target == target), None)
        if record is None or not _fits(record, fmt, virtual_size):
            return None  # the newest good version decides: older ones are further off
        table = _table(folder, record)
        if table is None:
            return None
        return SharedBase(number, folder / record.file, table, record.blake3)
    return None


def _fits(record: DiskRecord, fmt: str, virtual_size: int) -> bool:
    return (
        record.format == fmt
        and record.virtual_size == virtual_size
        and not record.chain
        and record.chunks is not None
        and record.chunks.chunk_size == TABLE_CHUNK
        and record.size is not None
    )


def _table(folder: Path, record: DiskRecord) -> ChunkTable | None:
    """The record's chunk table, read only if it matches its digest in the manifest."""
    ref = record.chunks
    assert ref is not None and record.size is not None
    path = folder / ref.file
    try:
        if file_digest(path) != ref.blake3:
            return None
        entries = b"".join(read_entries(path, chunk_count(record.size, ref.chunk_size)))
    except (OSError, TableError):
        return None
    return ChunkTable(record.size, ref.chunk_size, entries)


def copy_shared(
    run: GuestRun,
    target: str,
    source: Path,
    fmt: str,
    dst: Path,
    cancel: threading.Event,
    pace: Pacer | None,
) -> SharedResult | None:
    """The disk copied as a clone of its base, only changed chunks written; None: no base.

    Needs a regular source file (a block device's size is not its st_size), a
    destination that can reflink, and a base (``find_base``). None leaves nothing
    behind; the caller copies in full, as on a filesystem without reflink.
    """
    partial = run.partial
    assert partial is not None
    if not stat.S_ISREG(os.stat(source).st_mode) or not supports_reflink(partial.path):
        return None
    with naming("reading", source):
        virtual_size = disk_files.virtual_size(source, fmt)
    base = find_base(partial.path.parent, run.name, partial.number, target, fmt, virtual_size)
    if base is None:
        return None
    run.say_info(f"copying {target} ({source}) as a clone of version {base.number}")
    try:
        result = shared_copy(
            source, dst, base.file, base.table,
            progress=run.copy_progress(target), cancel=cancel, pace=pace,
            previous_blake3=base.blake3,
        )  # fmt: skip
    except OSError as exc:
        dst.unlink(missing_ok=True)
        raise CopyError(f"cannot copy {source} to {dst}: {exc.strerror or exc}") from exc
    if result is not None and result.unchanged:
        run.say_info(f"{target}: unchanged since version {base.number}, nothing written")
    elif result is not None:
        run.say_info(
            f"{target}: shared with version {base.number}, "
            f"wrote {byte_size(result.written)} of {byte_size(result.data_bytes)}"
        )
    return result
