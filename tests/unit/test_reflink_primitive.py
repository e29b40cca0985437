"""The FICLONE helpers on a real XFS (reflink) loop mount, and on tmpfs, which has none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.reflink import clone_file, supports_reflink


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with scratch_fs(tmp_path, "xfs") as root:
        yield root


def test_a_clone_has_the_bytes_and_writing_it_leaves_the_source_alone(xfs: Path) -> None:
    source = xfs / "disk.raw"
    source.write_bytes(b"A" * 1024 * 1024)
    assert supports_reflink(xfs)
    assert clone_file(source, xfs / "clone.raw")
    with (xfs / "clone.raw").open("r+b") as handle:
        handle.write(b"B" * 4096)
    assert source.read_bytes() == b"A" * 1024 * 1024
    assert (xfs / "clone.raw").read_bytes()[:4096] == b"B" * 4096
    assert sorted(p.name for p in xfs.iterdir()) == ["clone.raw", "disk.raw"]  # no probe left


def test_without_reflink_nothing_is_left_behind() -> None:
    directory = Path("/dev/shm")
    source = directory / "gs-reflink-source"
    source.write_bytes(b"x" * 4096)
    try:
        assert not supports_reflink(directory)
        assert not clone_file(source, directory / "gs-reflink-clone")
        assert not (directory / "gs-reflink-clone").exists()
    finally:
        source.unlink()
