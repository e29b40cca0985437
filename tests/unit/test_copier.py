"""Copier: sparse copies, digests, refusals, failures and reflinks on real files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from guestsafe.engine import copier
from guestsafe.engine.copier import TABLE_CHUNK, ChunkTable, CopyResult, copy_file, hash_file
from guestsafe.engine.errors import CopyError

MiB = 1024 * 1024


def make_sparse(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> bytes:
    """Write random data at (offset, length) pairs into a sparse file; return its content."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path.read_bytes()


def digest(content: bytes) -> str:
    return str(blake3.blake3(content).hexdigest())


def data_extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(copier._raw_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


@pytest.fixture
def sparse_src(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "disk.raw"
    layout = [(0, 64 * 1024), (5 * MiB, 3 * MiB), (20 * MiB, 4096), (40 * MiB + 8192, 17 * MiB)]
    return src, make_sparse(src, 96 * MiB, layout)


def assert_copy(src: Path, dst: Path, content: bytes, result: CopyResult) -> None:
    assert dst.read_bytes() == content
    assert result.size == len(content)
    assert result.blake3 == digest(content)
    assert hash_file(dst) == result.blake3
    assert (dst.stat().st_mode & 0o777) == 0o600


def test_sparse_round_trip_keeps_holes(sparse_src: tuple[Path, bytes], tmp_path: Path) -> None:
    src, content = sparse_src
    dst = tmp_path / "copy.raw"
    result = copy_file(src, dst)
    assert_copy(src, dst, content, result)
    assert not result.cloned
    assert result.data_bytes == 64 * 1024 + 3 * MiB + 4096 + 17 * MiB
    assert data_extents(dst) == data_extents(src)
    src_blocks, dst_blocks = src.stat().st_blocks, dst.stat().st_blocks
    assert dst_blocks <= src_blocks + 2048  # 1 MiB of slack for filesystem metadata
    assert dst_blocks * 512 < len(content) // 2


def test_empty_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "empty", tmp_path / "copy"
    src.touch()
    calls: list[tuple[int, int]] = []
    result = copy_file(src, dst, progress=lambda d, t: calls.append((d, t)))
    assert result == CopyResult(0, 0, digest(b""), False, ChunkTable(0, TABLE_CHUNK, b""))
    assert dst.read_bytes() == b""
    assert calls == [(0, 0)]
    assert hash_file(src) == digest(b"")


@pytest.mark.parametrize("size", [1, 4095, 4097, 16 * MiB + 123, 3 * MiB - 1])
def test_unaligned_sizes(tmp_path: Path, size: int) -> None:
    src, dst = tmp_path / f"odd-{size}", tmp_path / "copy"
    content = os.urandom(size)
    src.write_bytes(content)
    assert_copy(src, dst, content, copy_file(src, dst))


def test_trailing_hole_and_unaligned_tail(tmp_path: Path) -> None:
    src, dst = tmp_path / "tail", tmp_path / "copy"
    content = make_sparse(src, 10 * MiB + 77, [(MiB, 5000), (10 * MiB, 77)])
    assert_copy(src, dst, content, copy_file(src, dst))
    src2, dst2 = tmp_path / "hole-at-end", tmp_path / "copy2"
    content2 = make_sparse(src2, 9 * MiB + 5, [(100, 10)])
    assert_copy(src2, dst2, content2, copy_file(src2, dst2))


@pytest.mark.parametrize("direct", [True, False])
def test_fragmented_file_small_extents_and_gaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Thousands of 4 KiB extents 12 KiB apart: read as merged spans, written as pieces."""
    if not direct:
        monkeypatch.setattr(copier, "O_DIRECT", 0)
    src, dst = tmp_path / "frag", tmp_path / "copy"
    layout = [(i * 16384, 4096) for i in range(2500)]  # 39 MiB: spans cross buffers
    layout += [(40 * MiB + 4096, 300 * 1024), (40 * MiB + 400 * 1024, 5)]
    content = make_sparse(src, 41 * MiB, layout)
    result = copy_file(src, dst)
    assert_copy(src, dst, content, result)
    assert result.data_bytes == 2500 * 4096 + 300 * 1024 + 4096
    assert data_extents(dst) == data_extents(src)


def test_existing_destination_is_refused_and_kept(
    sparse_src: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, _ = sparse_src
    dst = tmp_path / "taken"
    dst.write_bytes(b"precious")
    with pytest.raises(CopyError, match="already exists"):
        copy_file(src, dst)
    assert dst.read_bytes() == b"precious"


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="cannot read"):
        copy_file(tmp_path / "nope", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_directory_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="not a regular file or block device"):
        copy_file(tmp_path, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_block_device_source(tmp_path: Path) -> None:
    """A guest disk on LVM or a partition: st_size is 0, the size comes from the device."""
    need_root_tool("losetup")
    image = tmp_path / "disk.img"
    content = make_sparse(image, 8 * MiB, [(MiB, 100 * 1024)])
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        dst = tmp_path / "copy"
        result = copy_file(Path(loop), dst)
        assert result.size == len(content)
        assert dst.read_bytes() == content
        assert result.blake3 == digest(content) == hash_file(Path(loop))
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_progress_reaches_total(sparse_src: tuple[Path, bytes], tmp_path: Path) -> None:
    src, _ = sparse_src
    calls: list[tuple[int, int]] = []
    result = copy_file(src, tmp_path / "copy", progress=lambda d, t: calls.append((d, t)))
    assert len(calls) >= 2
    assert calls[-1] == (result.data_bytes, result.data_bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    verify_calls: list[tuple[int, int]] = []
    hash_file(src, progress=lambda d, t: verify_calls.append((d, t)))
    assert verify_calls[-1] == (result.data_bytes, result.data_bytes)


def threads_settled(before: int) -> bool:
    return threading.active_count() == before


def test_cancel_removes_destination(tmp_path: Path) -> None:
    src, dst = tmp_path / "big", tmp_path / "copy"
    make_sparse(src, 64 * MiB, [(0, 48 * MiB)])
    cancel = threading.Event()
    before = threading.active_count()

    def progress(done: int, total: int) -> None:
        cancel.set()

    with pytest.raises(CopyError, match="copy cancelled"):
        copy_file(src, dst, progress=progress, cancel=cancel)
    assert not dst.exists()
    assert threads_settled(before)


def test_cancel_before_start_and_during_verify(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sparse(src, 8 * MiB, [(0, MiB)])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CopyError, match="cancelled"):
        copy_file(src, tmp_path / "copy", cancel=cancel)
    assert not (tmp_path / "copy").exists()
    with pytest.raises(CopyError, match="cancelled"):
        hash_file(src, cancel=cancel)


@pytest.mark.parametrize(
    ("action", "pattern"), [("enospc", "no space left on"), ("raise", "cannot write")]
)
def test_failpoint_failure_removes_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, pattern: str
) -> None:
    src, dst = tmp_path / "src", tmp_path / "copy"
    make_sparse(src, 64 * MiB, [(0, 40 * MiB)])
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", f"copy.chunk={action}")
    before = threading.active_count()
    with pytest.raises(CopyError, match=pattern) as info:
        copy_file(src, dst)
    assert not dst.exists()
    assert threads_settled(before)
    if action == "enospc":
        assert str(tmp_path) in str(info.value)
        assert "still needed" in str(info.value)


def test_progress_callback_error_propagates_and_cleans_up(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "copy"
    make_sparse(src, 64 * MiB, [(0, 40 * MiB)])
    before = threading.active_count()

    def progress(done: int, total: int) -> None:
        raise RuntimeError("ui went away")

    with pytest.raises(RuntimeError, match="ui went away"):
        copy_file(src, dst, progress=progress)
    assert not dst.exists()
    assert threads_settled(before)


def test_buffered_fallback_when_o_direct_is_unavailable(
    sparse_src: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copier, "O_DIRECT", 0)
    src, content = sparse_src
    dst = tmp_path / "copy"
    result = copy_file(src, dst)
    assert_copy(src, dst, content, result)
    assert data_extents(dst) == data_extents(src)


def test_o_direct_refused_at_io_time_falls_back(
    sparse_src: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems open with O_DIRECT but fail the I/O with EINVAL."""
    real_preadv, real_pwrite = os.preadv, os.pwrite

    def refuse_direct(fd: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        refuse_direct(fd)
        return real_preadv(fd, buffers, offset)

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        refuse_direct(fd)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwrite", pwrite)
    src, content = sparse_src
    dst = tmp_path / "copy"
    assert_copy(src, dst, content, copy_file(src, dst))
    assert data_extents(dst) == data_extents(src)


def test_read_error_names_source_and_removes_destination(
    sparse_src: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", preadv)
    src, _ = sparse_src
    dst = tmp_path / "copy"
    before = threading.active_count()
    with pytest.raises(CopyError, match=f"cannot read {src}: Input/output error"):
        copy_file(src, dst)
    assert not dst.exists()
    assert threads_settled(before)
    with pytest.raises(CopyError, match="Input/output error"):
        hash_file(src)


def test_hash_file_matches_whole_content(sparse_src: tuple[Path, bytes]) -> None:
    src, content = sparse_src
    assert hash_file(src) == digest(content)
    b3sum = shutil.which("b3sum")
    if b3sum:
        out = subprocess.run(
            [b3sum, "--no-names", str(src)], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == digest(content)


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="cannot read"):
        hash_file(tmp_path / "nope")


# --------------------------------------------------------------------------- real filesystems


def need_root_tool(tool: str) -> None:
    """Skip when the machine cannot mount filesystems, but never quietly under CI."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to mount a filesystem"
    elif shutil.which(tool) is None:
        reason = f"{tool} is not installed (apt-get install xfsprogs)"
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test")
    pytest.skip(reason)


@contextlib.contextmanager
def mounted(args: list[str], mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    subprocess.run(["mount", *args, str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    need_root_tool("mkfs.xfs")
    image = tmp_path / "xfs.img"
    with image.open("wb") as f:
        f.truncate(320 * MiB)
    subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True
    )
    with mounted(["-o", "loop", str(image)], tmp_path / "xfs") as mnt:
        yield mnt


def test_reflink_on_xfs(xfs: Path) -> None:
    src, dst = xfs / "disk.raw", xfs / "copy.raw"
    content = make_sparse(src, 64 * MiB, [(MiB, 2 * MiB), (50 * MiB, 100)])
    calls: list[tuple[int, int]] = []
    result = copy_file(src, dst, progress=lambda d, t: calls.append((d, t)))
    assert result.cloned
    assert_copy(src, dst, content, result)
    assert calls[-1] == (result.data_bytes, result.data_bytes)
    assert data_extents(dst) == data_extents(src)


def test_cross_filesystem_falls_back_to_copy(xfs: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "disk.raw", xfs / "copy.raw"
    content = make_sparse(src, 32 * MiB, [(MiB, 2 * MiB)])
    result = copy_file(src, dst)
    assert not result.cloned
    assert_copy(src, dst, content, result)


def test_real_enospc_names_target_and_removes_partial(tmp_path: Path) -> None:
    need_root_tool("mount")
    src = tmp_path / "src"
    make_sparse(src, 64 * MiB, [(0, 24 * MiB), (40 * MiB, 8 * MiB)])
    with mounted(["-t", "tmpfs", "-o", "size=8m", "tmpfs"], tmp_path / "small") as mnt:
        dst = mnt / "copy.raw"
        with pytest.raises(CopyError, match="no space left on") as info:
            copy_file(src, dst)
        assert str(mnt) in str(info.value)
        assert "still needed" in str(info.value)
        assert not dst.exists()
