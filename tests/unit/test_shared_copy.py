"""Shared versions: a disk copied as a clone of the previous version, only changed chunks written.

On a real XFS (reflink) loop mount, as test_reflink_primitive.py makes one, and on
tmpfs, which has no reflink: there the copy is a full copy as before.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.chunks import table_bytes
from guestsafe.engine.archive.manifest import CHUNK_TABLE_FORMAT, DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.shared_base import find_base
from guestsafe.engine.backup.shared_copy import os_fallocate, shared_copy
from guestsafe.engine.copier import TABLE_CHUNK, ChunkTable, copy_file
from guestsafe.engine.errors import Cancelled

MiB = 1024 * 1024
UUID = "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
XML = "<domain type='qemu'><name>web</name></domain>\n"


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with scratch_fs(tmp_path, "xfs") as root:
        yield root


def sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def first_disk(path: Path) -> None:
    """40 MiB: ten chunks, data in chunks 0-5 and 8, holes in 6, 7 and 9."""
    rng = random.Random(1)
    sparse(path, 40 * MiB, [(i * TABLE_CHUNK, rng.randbytes(TABLE_CHUNK)) for i in range(6)]
           + [(8 * TABLE_CHUNK + 4096, rng.randbytes(100_000))])  # fmt: skip


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def full_copy(src: Path, dst: Path) -> tuple[str, ChunkTable]:
    result = copy_file(src, dst)
    assert result.chunks is not None
    return result.blake3, result.chunks


def test_an_unchanged_disk_writes_nothing_and_shares_every_block(xfs: Path) -> None:
    src, first, second = xfs / "src.raw", xfs / "v1.raw", xfs / "v2.raw"
    first_disk(src)
    digest, table = full_copy(src, first)
    free_before = shutil.disk_usage(xfs).free
    result = shared_copy(src, second, first, table, previous_blake3=digest)
    assert result is not None and result.written == 0 and result.unchanged
    assert result.blake3 == digest and result.chunks == table
    assert second.read_bytes() == src.read_bytes()
    assert free_before - shutil.disk_usage(xfs).free < MiB  # the clone's blocks are shared
    assert b"shared" in subprocess.run(["filefrag", "-v", str(second)], capture_output=True,
                                       check=True).stdout  # fmt: skip


def test_changed_chunks_are_written_and_the_result_is_a_full_copys_bytes(xfs: Path) -> None:
    src, first, second, reference = (xfs / n for n in ("src.raw", "v1.raw", "v2.raw", "ref.raw"))
    first_disk(src)
    first_digest, table = full_copy(src, first)
    before = first.read_bytes()
    rng = random.Random(2)
    with src.open("r+b") as f:
        f.seek(1 * TABLE_CHUNK + 77)
        f.write(rng.randbytes(5000))  # data changed in chunk 1
        f.seek(7 * TABLE_CHUNK)
        f.write(rng.randbytes(8192))  # a hole became data: chunk 7
    fd = os.open(src, os.O_WRONLY)
    try:
        os_fallocate(fd, 0x03, 3 * TABLE_CHUNK, TABLE_CHUNK)  # data became a hole: chunk 3
    finally:
        os.close(fd)
    result = shared_copy(src, second, first, table, previous_blake3=first_digest)
    digest, table2 = full_copy(src, reference)
    assert result is not None and not result.unchanged
    assert second.read_bytes() == src.read_bytes() == reference.read_bytes()
    assert result.blake3 == digest and result.chunks == table2
    # One 64 KiB block each in chunks 1 and 7; chunk 3 punched, nothing written.
    assert result.written == 2 * 64 * 1024
    assert first.read_bytes() == before  # the previous version's file is untouched
    assert allocated(second) <= allocated(reference) + 2 * 64 * 1024  # whole 64 KiB blocks


@pytest.mark.parametrize("new_size", [38 * MiB + 4096, 46 * MiB + 512])
def test_a_file_that_shrank_or_grew_still_comes_out_exact(xfs: Path, new_size: int) -> None:
    src, first, second = xfs / "src.raw", xfs / "v1.raw", xfs / "v2.raw"
    first_disk(src)
    _, table = full_copy(src, first)
    with src.open("r+b") as f:
        f.truncate(new_size)
        f.seek(new_size - 100)
        f.write(b"end" * 30)
    result = shared_copy(src, second, first, table)
    assert result is not None
    assert second.read_bytes() == src.read_bytes()
    assert result.blake3 == blake3.blake3(src.read_bytes()).hexdigest()


def test_a_crash_mid_copy_removes_the_new_file_and_leaves_the_old_one(
    xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, first, second = xfs / "src.raw", xfs / "v1.raw", xfs / "v2.raw"
    first_disk(src)
    _, table = full_copy(src, first)
    before = first.read_bytes()
    with src.open("r+b") as f:
        f.write(b"changed")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "copy.chunk=raise")
    with pytest.raises(Exception, match=r"copy\.chunk"):
        shared_copy(src, second, first, table)
    assert not second.exists() and first.read_bytes() == before


def test_a_cancelled_copy_leaves_nothing(xfs: Path) -> None:
    src, first, second = xfs / "src.raw", xfs / "v1.raw", xfs / "v2.raw"
    first_disk(src)
    _, table = full_copy(src, first)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        shared_copy(src, second, first, table, cancel=cancel)
    assert not second.exists()


def test_without_reflink_there_is_no_shared_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"gs-shared-{os.getpid()}"
    shm.mkdir()
    try:
        src, first = shm / "src.raw", shm / "v1.raw"
        sparse(src, 8 * MiB, [(0, b"x" * 4096)])
        _, table = full_copy(src, first)
        assert shared_copy(src, shm / "v2.raw", first, table) is None
        assert not (shm / "v2.raw").exists()
    finally:
        shutil.rmtree(shm)


# --- the base: which previous version a disk shares with ---------------------------


def commit(archive: Archive, src: Path, virtual_size: int | None = None) -> int:
    partial = archive.begin("web")
    partial.write_domain_xml(XML)
    result = copy_file(src, partial.file_path("vda.raw"))
    record = DiskRecord(
        "vda", str(src), "raw", virtual_size or result.size, result.data_bytes, "vda.raw",
        result.blake3, chunks=partial.write_chunk_table("vda.raw", result.chunks),
    )  # fmt: skip
    manifest = Manifest(
        CHUNK_TABLE_FORMAT, "web", UUID, "hv1", "stop", "2025-03-01T02:00:00+00:00",
        "2025-03-01T02:03:00+00:00", 1.0, "0.1.0", [record], None, [],
    )  # fmt: skip
    return partial.commit(manifest).number


def test_the_base_is_the_newest_good_version_with_an_intact_table(tmp_path: Path) -> None:
    archive = Archive.open(tmp_path / "backup", create=True)
    src = tmp_path / "src.raw"
    first_disk(src)
    one, two = commit(archive, src), commit(archive, src)
    guest_dir = archive.root / "web"
    size = src.stat().st_size
    base = find_base(guest_dir, "web", 3, "vda", "raw", size)
    assert base is not None and base.number == two
    assert base.table.entries == table_of(guest_dir / str(two))
    assert find_base(guest_dir, "web", 3, "vda", "qcow2", size) is None  # another format
    assert find_base(guest_dir, "web", 3, "vda", "raw", size + TABLE_CHUNK) is None  # resized
    assert find_base(guest_dir, "web", 3, "vdb", "raw", size) is None  # another disk
    assert find_base(guest_dir, "web", 2, "vda", "raw", size).number == one  # type: ignore[union-attr]
    with (guest_dir / str(two) / "vda.raw.chunks").open("r+b") as f:
        f.write(b"0")  # an edited table matches no digest
    assert find_base(guest_dir, "web", 3, "vda", "raw", size) is None
    (report,) = archive.verify("web", two)
    assert not report.ok  # a version that failed verification is not a base: the one before is
    assert find_base(guest_dir, "web", 3, "vda", "raw", size).number == one  # type: ignore[union-attr]


def table_of(folder: Path) -> bytes:
    lines = (folder / "vda.raw.chunks").read_bytes().splitlines()
    entries = (bytes(32) if line == b"hole" else bytes.fromhex(line.decode()) for line in lines)
    return b"".join(entries)


def test_table_bytes_round_trip() -> None:
    table = ChunkTable(2 * TABLE_CHUNK, TABLE_CHUNK, bytes(32) + b"\x01" * 32)
    assert table_bytes(table) == b"hole\n" + b"01" * 32 + b"\n"
