"""promote --target-dir: the directory is checked before a byte is copied (issue #14)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from guestsafe.engine.archive.in_use import BootRecord
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.restore import promote_target
from guestsafe.engine.restore.promote_target import check_target_dir

Usage = namedtuple("Usage", "total used free")


def _record(tmp_path: Path) -> BootRecord:
    archive = tmp_path / "archive"
    version = archive / "web1" / "3"
    version.mkdir(parents=True)
    (version / "vda.qcow2").write_bytes(b"\1" * 65536)
    overlay = tmp_path / "images" / "web1-now-vda.qcow2"
    overlay.parent.mkdir()
    overlay.write_bytes(b"\2" * 4096)
    return BootRecord(
        "web1-now", "u-1", "web1", 3, str(archive), str(version), {"vda": str(overlay)}
    )


def _xml(record: BootRecord) -> str:
    backing = Path(record.version_path) / "vda.qcow2"
    return (
        "<domain><devices><disk type='file'>"
        f"<source file='{record.overlays['vda']}'/>"
        f"<backingStore type='file'><source file='{backing}'/><backingStore/></backingStore>"
        "<target dev='vda'/></disk></devices></domain>"
    )


def test_a_good_directory_gives_each_disk_its_new_file(tmp_path: Path) -> None:
    record = _record(tmp_path)
    target = tmp_path / "vms"
    target.mkdir()
    assert check_target_dir(target, record, _xml(record)) == {"vda": target / "web1-now-vda.qcow2"}


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("missing", "does not exist"),
        ("a-file", "is not a directory"),
        ("archive", "lies inside the archive"),
        ("archive/web1", "lies inside the archive"),
    ],
)
def test_a_bad_directory_is_refused(tmp_path: Path, where: str, fragment: str) -> None:
    record = _record(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RestoreError, match=fragment):
        check_target_dir(tmp_path / where, record, _xml(record))


def test_a_symlink_into_the_archive_is_inside_it(tmp_path: Path) -> None:
    record = _record(tmp_path)
    (tmp_path / "looks-elsewhere").symlink_to(tmp_path / "archive" / "web1")
    with pytest.raises(RestoreError, match="inside the archive"):
        check_target_dir(tmp_path / "looks-elsewhere", record, _xml(record))


def test_too_little_room_is_refused_with_both_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _record(tmp_path)
    target = tmp_path / "vms"
    target.mkdir()
    needed = sum(
        p.stat().st_blocks * 512
        for p in (Path(record.overlays["vda"]), Path(record.version_path) / "vda.qcow2")
    )
    monkeypatch.setattr(promote_target.shutil, "disk_usage", lambda _p: Usage(0, 0, needed - 1))
    with pytest.raises(RestoreError, match="free; the disks need up to"):
        check_target_dir(target, record, _xml(record))
    monkeypatch.setattr(promote_target.shutil, "disk_usage", lambda _p: Usage(0, 0, needed))
    assert check_target_dir(target, record, _xml(record))
    assert shutil is promote_target.shutil


def test_an_existing_file_of_that_name_is_never_overwritten(tmp_path: Path) -> None:
    record = _record(tmp_path)
    target = tmp_path / "vms"
    target.mkdir()
    (target / "web1-now-vda.qcow2").write_text("mine")
    with pytest.raises(RestoreError, match="never overwrites"):
        check_target_dir(target, record, _xml(record))
