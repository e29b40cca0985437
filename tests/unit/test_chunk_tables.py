"""Format 3: chunk tables written by the copier, verify by chunk, format 1 still read."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import blake3
import pytest

from guestsafe.engine import events
from guestsafe.engine.archive import chunks
from guestsafe.engine.archive.chunks import table_bytes, verify_file
from guestsafe.engine.archive.manifest import (
    B3SUMS_FILE,
    CHUNK_TABLE_FORMAT,
    MANIFEST_FILE,
    DiskRecord,
    Manifest,
)
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import HOLE, TABLE_CHUNK, copy_file, hash_with_chunks
from guestsafe.engine.errors import ArchiveError, Cancelled
from guestsafe.engine.restore.files import restore_file

MiB = 1024 * 1024
UUID = "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
XML = "<domain type='qemu'><name>web</name></domain>\n"


def sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def independent_table(path: Path) -> list[bytes]:
    """b3sum of each 4 MiB piece of the file as read, HOLE where it reads as zeros."""
    entries = []
    with path.open("rb") as f:
        while piece := f.read(TABLE_CHUNK):
            zero = piece.count(0) == len(piece)
            entries.append(HOLE if zero else blake3.blake3(piece).digest())
    return entries


def source_disk(tmp_path: Path) -> Path:
    """18.5 MiB: data across a chunk boundary, small extents, whole holes, zeros as data."""
    rng = random.Random(5)
    src = tmp_path / "src.raw"
    sparse(src, 18 * MiB + 512 * 1024, [
        (4 * MiB - 4096, rng.randbytes(8192)),  # straddles chunks 0 and 1
        (9 * MiB + 100, rng.randbytes(300)),  # a small extent in chunk 2
        (12 * MiB, bytes(MiB)),  # zeros written as data in chunk 3: reads as a hole
        (16 * MiB + 7, rng.randbytes(1000)),  # the short last chunk
    ])  # fmt: skip
    return src


def tabled(tmp_path: Path, data: bytes | None = None) -> tuple[Path, Path]:
    """``src.raw`` (``data``, else ``source_disk``'s) and its chunk table beside it."""
    src = source_disk(tmp_path) if data is None else tmp_path / "src.raw"
    if data is not None:
        sparse(src, len(data), [(0, data)])
    table = tmp_path / "src.raw.chunks"
    table.write_bytes(table_bytes(hash_with_chunks(src).chunks))
    return src, table


def test_copier_table_matches_an_independent_computation(tmp_path: Path) -> None:
    src = source_disk(tmp_path)
    result = copy_file(src, tmp_path / "copy.raw")
    assert result.chunks is not None
    table = result.chunks
    assert (table.size, table.chunk_size, len(table)) == (src.stat().st_size, TABLE_CHUNK, 5)
    expected = independent_table(src)
    assert [table.entry(i) for i in range(len(table))] == expected
    assert [e == HOLE for e in expected] == [False, False, False, True, False]
    hashed = hash_with_chunks(tmp_path / "copy.raw")  # push and chain copies hash this way
    assert hashed.chunks == table
    assert hashed.blake3 == result.blake3 == blake3.blake3(src.read_bytes()).hexdigest()


def test_a_table_of_a_file_without_data_is_all_holes(tmp_path: Path) -> None:
    src = tmp_path / "empty.raw"
    sparse(src, 10 * MiB, [])
    table = hash_with_chunks(src).chunks
    assert table_bytes(table) == b"hole\nhole\nhole\n"


# --- versions in format 3 ------------------------------------------------------


def commit_version(archive: Archive, src: Path, name: str = "vda.raw") -> VersionInfo:
    """A version written the way the backup writes one: copy_file, table, commit."""
    partial = archive.begin("web")
    partial.write_domain_xml(XML)
    result = copy_file(src, partial.file_path(name))
    record = DiskRecord(
        "vda", str(src), "raw", result.size, result.data_bytes, name, result.blake3,
        chunks=partial.write_chunk_table(name, result.chunks),
    )  # fmt: skip
    manifest = Manifest(
        CHUNK_TABLE_FORMAT, "web", UUID, "hv1", "stop", "2025-03-01T02:00:00+00:00",
        "2025-03-01T02:03:00+00:00", 1.0, "0.1.0", [record], None, [],
    )  # fmt: skip
    return partial.commit(manifest)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive.open(tmp_path / "backup", create=True)


def problems(archive: Archive) -> list[str]:
    (report,) = archive.verify("web", 1)
    return report.problems


def test_a_format_3_version_lists_and_protects_its_table(archive: Archive, tmp_path: Path) -> None:
    version = commit_version(archive, source_disk(tmp_path))
    data = json.loads((version.path / MANIFEST_FILE).read_text())
    assert data["format"] == CHUNK_TABLE_FORMAT
    ref = data["disks"][0]["chunks"]
    table = version.path / "vda.raw.chunks"
    assert ref == {
        "file": "vda.raw.chunks",
        "chunk_size": TABLE_CHUNK,
        "blake3": blake3.blake3(table.read_bytes()).hexdigest(),
    }
    assert table.read_bytes() == table_bytes(hash_with_chunks(version.path / "vda.raw").chunks)
    # b3sum --check B3SUMS covers the table too, without guestsafe.
    b3sums = (version.path / B3SUMS_FILE).read_text().splitlines()
    assert f"{ref['blake3']}  vda.raw.chunks" in b3sums
    assert problems(archive) == []


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_names_the_file_and_the_chunk(archive: Archive, tmp_path: Path) -> None:
    version = commit_version(archive, source_disk(tmp_path))
    flip(version.path / "vda.raw", 9 * MiB + 200)
    assert problems(archive) == ["vda.raw: chunk at offset 8 MiB (8388608) does not match"]
    assert archive.version("web", 1).verified is False


def test_a_byte_written_into_a_hole_is_found(archive: Archive, tmp_path: Path) -> None:
    src = source_disk(tmp_path)
    version = commit_version(archive, src)
    with (version.path / "vda.raw").open("r+b") as f:
        f.seek(13 * MiB - 1)  # chunk 3: a hole in the table, allocated zeros in the file
        f.write(b"\x01")
        f.seek(5 * MiB)  # chunk 1, in a hole of the file beside its data
        f.write(b"\x02")
    assert problems(archive) == [
        "vda.raw: chunk at offset 4 MiB (4194304) does not match",
        "vda.raw: chunk at offset 12 MiB (12582912) does not match "
        "(a hole in the table, data in the file)",
    ]


def test_a_new_extent_in_a_hole_chunk_is_found(archive: Archive, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    sparse(src, 40 * MiB, [(0, os.urandom(4096))])
    version = commit_version(archive, src)
    with (version.path / "vda.raw").open("r+b") as f:
        f.seek(30 * MiB + 4096)
        f.write(b"\x03")
    assert problems(archive) == [
        "vda.raw: chunk at offset 28 MiB (29360128) does not match "
        "(a hole in the table, data in the file)"
    ]


def test_zeros_written_into_a_hole_chunk_still_verify(archive: Archive, tmp_path: Path) -> None:
    # A filesystem without holes, or a copy tool that wrote them, stores zeros as data.
    src = tmp_path / "src.raw"
    sparse(src, 12 * MiB, [(0, os.urandom(4096))])
    version = commit_version(archive, src)
    with (version.path / "vda.raw").open("r+b") as f:
        f.seek(8 * MiB)
        f.write(bytes(4 * MiB))
    assert problems(archive) == []


def test_a_tampered_table_is_reported_and_the_file_checked_whole(
    archive: Archive, tmp_path: Path
) -> None:
    version = commit_version(archive, source_disk(tmp_path))
    table = version.path / "vda.raw.chunks"
    lines = table.read_bytes().splitlines(keepends=True)
    lines[2] = b"hole\n"  # as if chunk 2 held nothing, so a change there would pass
    table.chmod(0o600)
    table.write_bytes(b"".join(lines))
    found = problems(archive)
    assert len(found) == 1
    assert found[0].startswith("vda.raw.chunks: blake3 mismatch")
    assert "edited or is damaged" in found[0]
    flip(version.path / "vda.raw", 9 * MiB + 200)  # the whole-file check still sees this
    found = problems(archive)
    assert len(found) == 2 and found[1].startswith("vda.raw: blake3 mismatch")


def test_a_missing_table_is_reported(archive: Archive, tmp_path: Path) -> None:
    version = commit_version(archive, source_disk(tmp_path))
    (version.path / "vda.raw.chunks").unlink()
    assert problems(archive) == ["vda.raw.chunks: missing"]


def test_a_malformed_table_is_reported(tmp_path: Path) -> None:
    src = source_disk(tmp_path)
    table = tmp_path / "t.chunks"
    table.write_bytes(b"hole\n" * 4)
    with pytest.raises(Exception, match="has 4 lines, its file has 5 chunks"):
        verify_file(src, "src.raw", table, TABLE_CHUNK)
    table.write_bytes(b"hole\n" * 4 + b"X" * 64 + b"\n")
    with pytest.raises(Exception, match="line 5 is neither 64 hex digits nor 'hole'"):
        verify_file(src, "src.raw", table, TABLE_CHUNK)


# --- format 1 ------------------------------------------------------------------

FORMAT_1_DATA = b"format one disk\n" * 1000


def format_1_version(archive: Archive) -> Path:
    """A version as guestsafe wrote it before chunk tables, written out by hand."""
    folder = archive.root / "web" / "1"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "vda.raw").write_bytes(FORMAT_1_DATA)
    (folder / "domain.xml").write_text(XML)
    disk_digest = blake3.blake3(FORMAT_1_DATA).hexdigest()
    xml_digest = blake3.blake3(XML.encode()).hexdigest()
    manifest = {
        "format": 1, "guest": "web", "uuid": UUID, "host": "hv1", "mode": "stop",
        "started": "2025-03-01T02:00:00+00:00", "finished": "2025-03-01T02:03:00+00:00",
        "downtime": 1.0, "tool_version": "0.1.0", "domain_xml_blake3": xml_digest,
        "disks": [{
            "target": "vda", "source": "/var/lib/libvirt/images/vda.raw", "format": "raw",
            "virtual_size": len(FORMAT_1_DATA), "allocated_size": len(FORMAT_1_DATA),
            "file": "vda.raw", "size": len(FORMAT_1_DATA), "blake3": disk_digest,
        }],
        "nvram": None, "notes": [],
    }  # fmt: skip
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / B3SUMS_FILE).write_text(f"{disk_digest}  vda.raw\n{xml_digest}  domain.xml\n")
    return folder


def test_a_format_1_version_verifies_and_restores(archive: Archive, tmp_path: Path) -> None:
    folder = format_1_version(archive)
    version = archive.version("web", 1)
    assert version.manifest is not None and version.manifest.format == 1
    assert problems(archive) == []
    flip(folder / "vda.raw", 100)
    assert problems(archive)[0].startswith("vda.raw: blake3 mismatch")
    flip(folder / "vda.raw", 100)
    version = archive.version("web", 1)
    record = version.manifest.disks[0] if version.manifest else None
    assert record is not None and record.chunks is None
    restored = tmp_path / "restored.raw"
    restore_file(version, record, restored, False, events.null_reporter, "web", None, [])
    assert restored.read_bytes() == FORMAT_1_DATA


@pytest.mark.parametrize(
    ("fmt", "message"),
    [(1, r"unknown key disks\[0\]\.'chunks'"), (2, "which format 2 does not have")],
)
def test_a_format_1_or_2_manifest_with_a_table_is_refused(
    archive: Archive, fmt: int, message: str
) -> None:
    folder = format_1_version(archive)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["format"] = fmt
    data["disks"][0]["chunks"] = {
        "file": "vda.raw.chunks",
        "chunk_size": TABLE_CHUNK,
        "blake3": "ab" * 32,
    }
    with pytest.raises(ArchiveError, match=message):
        Manifest.from_json(json.dumps(data))
    data["format"] = CHUNK_TABLE_FORMAT
    assert Manifest.from_json(json.dumps(data)).disks[0].chunks is not None


# --- speed and memory ------------------------------------------------------------


def sparse_table_text(path: Path) -> bytes:
    """The table written by hand, reading only chunks SEEK_DATA finds data in."""
    lines = []
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, TABLE_CHUNK):
            try:
                has_data = os.lseek(f.fileno(), offset, os.SEEK_DATA) < offset + TABLE_CHUNK
            except OSError:  # ENXIO: no data after offset
                has_data = False
            f.seek(offset)
            piece = f.read(TABLE_CHUNK) if has_data else b""
            lines.append(blake3.blake3(piece).hexdigest() if has_data else "hole")
    return "".join(line + "\n" for line in lines).encode()


# The peak RSS from VmHWM: ru_maxrss would include the forked pytest's before exec.
BIG_CHILD = textwrap.dedent("""
    import json, re, sys, time
    from pathlib import Path
    from guestsafe.engine.archive.chunks import verify_file
    start = time.perf_counter()
    found = verify_file(Path(sys.argv[1]), "big.raw", Path(sys.argv[2]), 4 << 20)
    seconds = time.perf_counter() - start
    peak = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())
    print(json.dumps({"problems": found.problems, "seconds": seconds,
                      "rss": int(peak.group(1)) * 1024}))
""")


def test_a_large_sparse_disk_verifies_fast_in_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    extents = [(n * 997 * MiB, os.urandom(2 * MiB)) for n in range(20)]
    sparse(big, 20 * 1024 * MiB, extents)
    if big.stat().st_blocks * 512 > 200 * MiB:
        pytest.fail("tmp_path's filesystem has no holes; the test needs one that has")
    table = tmp_path / "big.raw.chunks"
    table.write_bytes(sparse_table_text(big))
    out = subprocess.run(
        [sys.executable, "-c", BIG_CHILD, str(big), str(table)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["problems"] == []
    # 5120 chunks, about 40 with data: the holes cost a SEEK_DATA each, not a read.
    assert result["seconds"] < 5
    assert result["rss"] < 100 * MiB
    flip(big, 19 * 997 * MiB + 5)
    started = time.perf_counter()
    found = verify_file(big, "big.raw", table, TABLE_CHUNK)
    assert time.perf_counter() - started < 5
    bad = 19 * 997 * MiB // TABLE_CHUNK * TABLE_CHUNK
    assert found.problems == [f"big.raw: chunk at offset {bad // MiB} MiB ({bad}) does not match"]


def test_a_cancelled_verify_stops_with_cancelled(tmp_path: Path) -> None:
    src, table = tabled(tmp_path)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        verify_file(src, "src.raw", table, TABLE_CHUNK, cancel=cancel)


def test_a_wrecked_file_names_its_first_ten_chunks_and_counts_the_rest(tmp_path: Path) -> None:
    src, table = tabled(tmp_path, os.urandom(64 * MiB))
    for n in range(16):
        flip(src, n * TABLE_CHUNK + 9)  # a real change: "!" may be the byte already there
    found = verify_file(src, "src.raw", table, TABLE_CHUNK)
    assert found.bad_chunks == 16
    assert found.problems == [
        *(f"src.raw: chunk at offset {4 * n} MiB ({n * TABLE_CHUNK}) does not match"
          for n in range(10)),
        "src.raw: 6 more chunks do not match",
    ]  # fmt: skip


def test_verify_progress_comes_from_the_callers_thread_and_reaches_the_size(
    archive: Archive, tmp_path: Path
) -> None:
    src = source_disk(tmp_path)
    commit_version(archive, src)
    seen: list[tuple[int, int, threading.Thread]] = []
    archive.verify(
        "web", 1, progress=lambda p: seen.append((p.done, p.total, threading.current_thread()))
    )
    assert {thread for _, _, thread in seen} == {threading.current_thread()}
    dones = [done for done, _, _ in seen]
    assert dones == sorted(dones) and dones[-1] == seen[-1][1]
    assert src.stat().st_size in dones  # the disk, then domain.xml
    assert len(dones) > 3  # chunk by chunk, not all at the end


def test_a_chunk_the_disk_cannot_read_is_named_and_the_rest_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, table = tabled(tmp_path, os.urandom(16 * MiB))
    flip(src, 3 * TABLE_CHUNK + 9)
    real_read = chunks._Reader.read

    def failing_read(self: chunks._Reader, view: memoryview, offset: int, length: int) -> None:
        if offset <= TABLE_CHUNK + 100 < offset + length:  # as btrfs's checksum refuses it
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_read(self, view, offset, length)

    monkeypatch.setattr(chunks._Reader, "read", failing_read)
    found = verify_file(src, "src.raw", table, TABLE_CHUNK)
    assert found.bad_chunks == 2
    assert found.problems == [
        "src.raw: chunk at offset 4 MiB (4194304) cannot be read (Input/output error)",
        "src.raw: chunk at offset 12 MiB (12582912) does not match",
    ]


def test_a_read_error_that_is_not_damage_still_stops_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, table = tabled(tmp_path, os.urandom(8 * MiB))

    def failing_read(self: chunks._Reader, view: memoryview, offset: int, length: int) -> None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(chunks._Reader, "read", failing_read)
    with pytest.raises(OSError, match="Bad file descriptor"):
        verify_file(src, "src.raw", table, TABLE_CHUNK)
