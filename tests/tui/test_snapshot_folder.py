"""Issue 12, case 20: each test run keeps its snapshot sandbox in a folder of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest_textual_snapshot
from tui_support import SNAPSHOT_DEMO_DIR, fresh_sandbox, snapshot_dir

TUI_TESTS = Path(__file__).resolve().parent
SHOW_DIR = (
    "import sys; sys.path.insert(0, sys.argv[1]); import tui_support; "
    "print(tui_support.fresh_sandbox().root)"
)


def test_case_20_each_test_run_has_its_own_snapshot_folder() -> None:
    mine = fresh_sandbox().root
    others = [
        subprocess.run(
            [sys.executable, "-c", SHOW_DIR, str(TUI_TESTS)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]

    assert mine == snapshot_dir() != SNAPSHOT_DEMO_DIR
    assert len({str(mine), *others}) == 3  # three runs, three folders
    assert all(len(p) == len(str(SNAPSHOT_DEMO_DIR)) for p in [str(mine), *others])
    assert not any(Path(p).exists() for p in others)  # each run removed its own
    assert mine.is_dir()


def test_case_20_the_svgs_show_the_fixed_folder() -> None:
    root = fresh_sandbox().root
    svg = f"<text>test://{root}/node.xml</text><text>{root}/archive</text>"

    shown = pytest_textual_snapshot.normalize_svg(svg)

    assert str(root) not in shown
    assert shown.count(str(SNAPSHOT_DEMO_DIR)) == 2
