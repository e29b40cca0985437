"""guestsafe list shows each version's allocated and unique size, and the archive's total."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.reflink import clone_file
from guestsafe.engine.archive.versions import VersionInfo, folder_size
from guestsafe.engine.modes import Mode
from guestsafe.engine.sizes import byte_size
from guestsafe.tui.cli import _print_versions, build_parser

MIB = 1024 * 1024


def _version(folder: Path, number: int) -> VersionInfo:
    return VersionInfo(
        "web",
        number,
        folder,
        None,
        folder_size(folder),
        "2026-01-01",
        Mode.STOP,
        True,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("fstype", ["xfs", "ext4"])
def test_list_shows_unique_sizes_and_the_total_on_the_device(
    tmp_path: Path, fstype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_fs(tmp_path, fstype) as root:
        first, second = root / "1", root / "2"
        first.mkdir()
        second.mkdir()
        (first / "vda.raw").write_bytes(os.urandom(8 * MIB))
        os.sync()
        if not clone_file(first / "vda.raw", second / "vda.raw"):
            (second / "vda.raw").write_bytes((first / "vda.raw").read_bytes())
        with (second / "vda.raw").open("r+b") as handle:
            handle.write(os.urandom(MIB))
        os.sync()
        versions = [_version(first, 1), _version(second, 2)]
        assert _print_versions([("/srv/backup", versions)]) == 0
    out = capsys.readouterr().out
    header, row1, _row2, total = out.splitlines()
    cells = [re.split(r"\s{2,}", line) for line in (header, row1)]
    assert cells[0][4:6] == ["ALLOCATED", "UNIQUE"]
    assert cells[1][4:6] == [byte_size(8 * MIB), byte_size(MIB if fstype == "xfs" else 8 * MIB)]
    expected = 9 * MIB if fstype == "xfs" else 16 * MIB
    assert total.startswith("/srv/backup: these 2 version(s) take " + byte_size(expected))
    assert "counted once" in total


def test_the_list_help_says_what_the_columns_mean() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["list"].format_help()  # type: ignore[union-attr]
    assert "UNIQUE" in help_text and "ALLOCATED" in help_text
