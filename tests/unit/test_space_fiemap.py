"""Unique sizes and the archive's total from FIEMAP, on a real XFS (reflink) and on ext4."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.reflink import clone_file
from guestsafe.engine.archive.space import space_of

MIB = 1024 * 1024


@pytest.fixture(params=["xfs", "ext4"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with scratch_fs(tmp_path, request.param) as root:
        yield request.param, root


def _write(path: Path, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _two_versions(root: Path) -> tuple[Path, Path, bool]:
    """Version 1 with 8 MiB of data; version 2 a clone (or copy) with 1 MiB rewritten."""
    first, second = root / "1", root / "2"
    first.mkdir()
    second.mkdir()
    _write(first / "vda.raw", os.urandom(8 * MIB))
    cloned = clone_file(first / "vda.raw", second / "vda.raw")
    if not cloned:
        _write(second / "vda.raw", (first / "vda.raw").read_bytes())
    _write(second / "vda.raw", os.urandom(MIB), offset=2 * MIB)
    (second / "manifest.json").write_text("{}")  # small files count too
    return first, second, cloned


def test_shared_blocks_are_not_unique_and_count_once_in_the_total(fs: tuple[str, Path]) -> None:
    fstype, root = fs
    first, second, cloned = _two_versions(root)
    assert cloned == (fstype == "xfs")
    space = space_of([first, second])
    allocated = [
        sum(p.stat().st_blocks * 512 for p in folder.iterdir()) for folder in (first, second)
    ]
    if cloned:
        # 7 MiB shared: each version holds only the 1 MiB the other does not.
        assert space.unique[first] == MIB
        assert MIB <= space.unique[second] < MIB + 64 * 1024
        assert 9 * MIB <= space.total < 9 * MIB + 64 * 1024
    else:
        # Full copies: every block is unique, and the total is the sum of the sizes.
        assert space.unique[first] == allocated[0]
        assert space.unique[second] == allocated[1]
        assert space.total == sum(allocated)


def test_deleting_the_other_version_makes_its_shared_blocks_unique(fs: tuple[str, Path]) -> None:
    _fstype, root = fs
    first, second, _cloned = _two_versions(root)
    (first / "vda.raw").unlink()
    os.sync()  # XFS frees an unlinked inode's extents in the background; sync waits for it
    space = space_of([second])
    assert space.unique[second] == sum(p.stat().st_blocks * 512 for p in second.iterdir())
    assert space.total == space.unique[second]


def test_without_fiemap_every_block_is_unique(tmp_path: Path) -> None:
    folder = Path("/dev/shm") / f"gs-space-{os.getpid()}"
    folder.mkdir()
    try:
        _write(folder / "vda.raw", b"x" * MIB)
        space = space_of([folder])
        allocated = (folder / "vda.raw").stat().st_blocks * 512
        assert space.unique[folder] == allocated == space.total
    finally:
        (folder / "vda.raw").unlink()
        folder.rmdir()


def test_holes_take_no_space(fs: tuple[str, Path]) -> None:
    _fstype, root = fs
    folder = root / "1"
    folder.mkdir()
    _write(folder / "vda.raw", b"y" * MIB, offset=64 * MIB)  # 64 MiB hole, then 1 MiB
    space = space_of([folder])
    assert space.unique[folder] == MIB == space.total
