"""Item 2's notices: whether a destination's versions share blocks, on XFS and ext4."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.sharing import (
    SUGGESTION,
    device_shares,
    directory_shares,
    sharing_note,
)


@pytest.mark.parametrize(("fstype", "expected"), [("xfs", True), ("ext4", False)])
def test_a_mounted_destination_says_what_its_versions_will_be(
    tmp_path: Path, fstype: str, expected: bool
) -> None:
    with scratch_fs(tmp_path, fstype) as root:
        assert directory_shares(root) is expected
        assert directory_shares(root / "not-made-yet") is expected  # judged by its parent
        assert directory_shares(root / "a" / "b") is None  # too far to judge
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith("lost")) == []
        note = sharing_note(expected, str(root))
        assert ("(reflink)" in note) is expected
        assert (SUGGESTION in note) is not expected


@pytest.mark.parametrize(("options", "expected"), [("reflink=1", True), ("reflink=0", False)])
def test_an_xfs_device_is_judged_by_its_superblock(
    tmp_path: Path, options: str, expected: bool
) -> None:
    image = tmp_path / "xfs.img"
    with image.open("wb") as handle:
        handle.truncate(300 * 1024 * 1024)
    result = subprocess.run(
        ["mkfs.xfs", "-q", "-f", "-m", options, str(image)], check=False, capture_output=True
    )
    if result.returncode != 0:
        pytest.fail(f"mkfs.xfs failed: {result.stderr.decode()}")
    assert device_shares("xfs", str(image)) is expected


def test_other_filesystems_are_full_copies_and_a_locked_container_is_unknown(
    tmp_path: Path,
) -> None:
    assert device_shares("btrfs", "/nonexistent") is True
    assert device_shares("ext4", "/nonexistent") is False
    assert device_shares("exfat", "/nonexistent") is False
    assert device_shares("crypto_LUKS", "/nonexistent") is None
    not_xfs = tmp_path / "zeros.img"
    not_xfs.write_bytes(b"\0" * 4096)
    assert device_shares("xfs", str(not_xfs)) is None  # no XFS magic: cannot tell
    assert "cannot tell" in sharing_note(None, "/srv/backup")
