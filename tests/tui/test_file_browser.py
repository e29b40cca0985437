"""The Restore tab's file browser, on a fake file source (the demo has no real disks).

The engine's libguestfs lister is proven by tests/integration/test_files_live.py;
here the console's part: `f` opens the browser on the chosen version, the tree
loads each folder only when opened, shows sizes and dates, `x` extracts the
selection into the folder typed, with progress, and Escape closes the source.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from test_console_flows import SIZE, select_row
from textual.widgets import ProgressBar, Static, Tree
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine, Entry, Extracted, ExtractProgress, Filesystem
from guestsafe.engine.errors import RestoreError
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.file_browser import FileBrowserScreen

pytestmark = pytest.mark.tui

MTIME = int(datetime(2024, 5, 17, 9, 30).timestamp()) * 10**9


def _entry(name: str, kind: str, size: int = 0) -> Entry:
    mode = 0o40755 if kind == "dir" else 0o100644
    return Entry(name, kind, size, mode, MTIME, MTIME)


class FakeSource:
    def __init__(self) -> None:
        self.filesystems = [Filesystem("/dev/sda1", "ext4", 64 << 20, "")]
        self.tree = {
            "/dev/sda1:/": [_entry("etc", "dir"), _entry("big.bin", "file", 3 << 20)],
            "/dev/sda1:/etc": [_entry("hosts", "file", 21)],
        }
        self.listed: list[str] = []
        self.extracted: list[tuple[str, Path]] = []
        self.closed = False

    def listdir(self, path: str) -> list[Entry]:
        self.listed.append(path)
        return self.tree[path]

    def extract(
        self,
        path: str,
        dest: Path,
        *,
        force: bool = False,
        progress: ExtractProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> Extracted:
        assert progress is not None
        total = 3 << 20
        for done in range(0, total + 1, 1 << 20):
            progress(done, total, path)
        self.extracted.append((path, dest))
        return Extracted(1, total, ())


def _tree_lines(screen: FileBrowserScreen) -> list[str]:
    tree = screen.query_one("#files-tree", Tree)
    lines = []
    stack = [tree.root]
    while stack:
        node = stack.pop()
        lines.append(str(node.label))
        stack.extend(reversed(node.children))
    return lines


async def test_f_opens_a_lazy_tree_and_x_extracts_the_selection(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = FakeSource()
    opened: list[tuple[str, int]] = []

    @contextmanager
    def version_files(archive: object, guest: str, number: int) -> Iterator[FakeSource]:
        opened.append((guest, number))
        try:
            yield source
        finally:
            source.closed = True

    monkeypatch.setattr(engine, "version_files", version_files)
    assert engine.run_job("mail-weekly").ok
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        versions = app.restore_pane._versions
        row = next(i for i, v in enumerate(versions) if v.guest == "mail")
        await select_row(pilot, "#archive-table", str(row))
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, FileBrowserScreen))
        screen = app.screen
        assert isinstance(screen, FileBrowserScreen)
        await wait_for(pilot, lambda: screen.query_one("#files-tree", Tree).display)
        assert opened == [("mail", versions[row].number)]
        assert source.listed == []  # nothing read before a folder is opened
        assert any("/dev/sda1:/  ext4  64.0 MiB" in line for line in _tree_lines(screen))

        await pilot.press("down", "space")  # open the filesystem
        await wait_for(pilot, lambda: any("big.bin" in s for s in _tree_lines(screen)))
        assert source.listed == ["/dev/sda1:/"]
        big = next(s for s in _tree_lines(screen) if "big.bin" in s)
        assert "3.0 MiB" in big and "2024-05-17 09:30" in big

        dest = tmp_path / "restored"
        screen.query_one("#files-dest").value = str(dest)  # type: ignore[attr-defined]
        screen.query_one("#files-tree", Tree).focus()
        await pilot.press("down", "down")  # etc/, then big.bin
        await pilot.press("x")
        await wait_for(pilot, lambda: source.extracted != [])
        await settle(pilot)
        assert source.extracted == [("/dev/sda1:/big.bin", dest)]
        status = str(screen.query_one("#files-status", Static).render())
        assert "extracted 1 files, 3.0 MiB" in status
        assert screen.query_one("#files-progress", ProgressBar).percentage == 1.0
        assert source.listed == ["/dev/sda1:/"]  # etc/ was never opened

        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, FileBrowserScreen))
        assert source.closed


async def test_an_appliance_that_does_not_start_shows_why_and_escape_closes(
    engine: Engine,
) -> None:
    @contextmanager
    def failing() -> Iterator[FakeSource]:
        raise RestoreError("the libguestfs appliance did not start: no kernel")
        yield FakeSource()  # never reached

    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.push_screen(FileBrowserScreen("mail version 1", failing))
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert "no kernel" in str(app.screen.query_one("#error-message", Static).render())
        await pilot.press("escape")  # the modal
        await wait_for(pilot, lambda: isinstance(app.screen, FileBrowserScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, FileBrowserScreen))
