"""Extraction's writer and path checks, with a fake appliance handle.

The real appliance is in tests/integration/test_files_live.py; here what the
host side does with what a (possibly hostile) guest filesystem hands it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from guestsafe.engine.browse.version_files import (
    Entry,
    _with_remote,
    _Writer,
    split_path,
)
from guestsafe.engine.errors import RestoreError

MTIME = 1_600_000_000 * 10**9


class FakeHandle:
    """Stands in for guestfs.GuestFS: download writes the remote's bytes to the path."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents

    def set_event_callback(self, callback: object, events: int) -> int:
        return 1

    def delete_event_callback(self, handle: int) -> None:
        pass

    def download(self, remote: str, local: str) -> None:
        with open(local, "wb") as f:
            f.write(self.contents[remote])


def _plan(*items: tuple[str, str, int, str]) -> list[tuple[PurePosixPath, Entry]]:
    plan = []
    for rel, kind, mode, extra in items:
        size = len(extra) if kind == "file" else 0
        entry = Entry(PurePosixPath(rel).name, kind, size, mode, MTIME, MTIME, extra)
        plan.append((PurePosixPath(rel), _with_remote(entry, "/" + rel)))
    return plan


TREE = _plan(
    ("top", "dir", 0o40750, ""),
    ("top/setuid", "file", 0o104755, "x"),
    ("top/link", "link", 0o120777, "/etc/passwd"),
    ("top/fifo", "other", 0o10644, ""),
)


def _writer(dest: Path, force: bool = False) -> _Writer:
    return _Writer(FakeHandle({"/top/setuid": b"x"}), dest, force, None, None)


def test_modes_lose_setuid_times_are_kept_links_are_not_followed(tmp_path: Path) -> None:
    result = _writer(tmp_path).write(TREE)
    top = tmp_path / "top"
    assert stat.S_IMODE((top / "setuid").stat().st_mode) == 0o755  # no setuid from a guest
    assert stat.S_IMODE(top.stat().st_mode) == 0o750
    assert top.stat().st_mtime_ns == MTIME == (top / "setuid").stat().st_mtime_ns
    assert os.readlink(top / "link") == "/etc/passwd"
    assert (top / "link").lstat().st_mtime_ns == MTIME
    assert not (top / "fifo").exists() and result.skipped == ("top/fifo",)


def test_existing_files_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "link").write_text("mine")
    with pytest.raises(RestoreError, match=r"already exist.*nothing was written"):
        _writer(tmp_path).write(TREE)
    assert not (tmp_path / "top" / "setuid").exists()
    assert (tmp_path / "top" / "link").read_text() == "mine"


def test_a_link_in_dest_where_a_folder_goes_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "top").symlink_to(outside)
    with pytest.raises(RestoreError, match="already exist"):
        _writer(dest).write(TREE)
    _writer(dest, force=True).write(TREE)  # the link goes, a real folder comes
    assert (dest / "top").is_dir() and not (dest / "top").is_symlink()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "path",
    ["/dev/sda1:/../etc", "/dev/sda1:etc", "sda1:/etc", "/etc/hosts", "/dev/sda1:/a\x1bb"],
)
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(RestoreError):
        split_path(path)


def test_paths_name_a_filesystem_and_a_path_in_it() -> None:
    assert split_path("/dev/sda1:/etc/") == ("/dev/sda1", "/etc")
    assert split_path("/dev/vg0/root:") == ("/dev/vg0/root", "/")
