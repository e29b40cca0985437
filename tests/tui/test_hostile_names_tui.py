"""Issue 7, case 11 in the console: hostile names are shown literally.

No Rich markup in a name is interpreted, and control and invisible characters
(ANSI escapes, tab, RTL override, zero-width space) appear as visible escapes,
in the Jobs, Guests, Restore and Log tabs. The guests live on libvirt's test
driver with real disk files and are really backed up first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from rich.text import Text
from rig.testnode import HOSTILE_NAMES, NodeGuest, node_engine, save_job, write_node
from textual.widgets import DataTable, Static
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.runlog import escape
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.mac_modal import MacClashScreen

pytestmark = pytest.mark.tui

SIZE = (160, 60)
# Libvirt cannot hold these; an archive from elsewhere can.
ARCHIVE_ONLY = ("\x1b[31mred\x1b[0m", "[b]x[/b]", "[link=file:///etc/passwd]click[/link]")
# Raw characters that must never reach the terminal.
RAW = ("\x1b", "\t", "\x7f", "\x85", "\u202e", "\u200b", "\u200d")
# Names whose brackets Rich would eat if they were parsed as markup.
MARKUP = ("[bold red]alarm", "[b]x[/b]", "[link=file:///etc/passwd]click[/link]")


def _screen_text(app: GuestsafeApp) -> str:
    strips = app.screen._compositor.render_strips()
    return "\n".join(strip.text for strip in strips)


def _column(app: GuestsafeApp, table_id: str) -> list[Any]:
    table = app.query_one(table_id, DataTable)
    return [table.get_row_at(i)[0] for i in range(table.row_count)]


def _commit(archive: Archive, guest: str, disk_dir: Path) -> None:
    """A version written with the archive API alone; its disk came from ``disk_dir``."""
    partial = archive.begin(guest)
    partial.write_domain_xml(
        "<domain type='test'><name>x</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>\n"
    )
    data = b"imported\n" * 64
    partial.file_path("vda.raw").write_bytes(data)
    digest = str(blake3.blake3(data).hexdigest())
    source = str(disk_dir / "imported-vda.raw")
    rec = DiskRecord("vda", source, "raw", 576, 4096, "vda.raw", digest)
    partial.commit(
        Manifest(
            1,
            guest,
            "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
            "elsewhere",
            "stop",
            "2025-03-01T02:00:00+00:00",
            "2025-03-01T02:03:00+00:00",
            1.0,
            "0.1.0",
            [rec],
            None,
        )
    )


@pytest.fixture
def hostile_engine(tmp_path: Path) -> Iterator[Engine]:
    guests = [NodeGuest(n, macs=[f"52:54:00:65:00:{i:02x}"]) for i, n in enumerate(HOSTILE_NAMES)]
    node = write_node(tmp_path / "node", guests)
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    engine = node_engine(node, tmp_path / "home")
    save_job(engine, "hostile", list(HOSTILE_NAMES), dest)
    result = engine.run_job("hostile")
    assert result.ok, [o.message for o in result.outcomes if not o.ok]
    archive = Archive.open(dest)
    for name in ARCHIVE_ONLY:
        _commit(archive, name, node.root / "disks")
    try:
        yield engine
    finally:
        engine.close()


def _assert_clean(screen: str) -> None:
    for raw in RAW:
        assert raw not in screen, f"{raw!r} reached the screen"


async def test_console_shows_hostile_names_literally(hostile_engine: Engine) -> None:
    app = GuestsafeApp(hostile_engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)

        # Jobs: the guests column holds the names, escaped, as plain Text, cut to
        # the column with an ellipsis; the panel under the table has them all.
        [guests_cell] = [app.query_one("#jobs-table", DataTable).get_row_at(0)[1]]
        assert isinstance(guests_cell, Text)
        listed = escape(", ".join(HOSTILE_NAMES))
        assert guests_cell.plain.endswith("…")
        assert listed.startswith(guests_cell.plain.removesuffix("…"))
        detail = app.query_one("#job-detail", Static).content
        assert isinstance(detail, Text) and listed in detail.plain
        _assert_clean(_screen_text(app))

        await pilot.press("g")
        await settle(pilot)
        await wait_for(pilot, lambda: app.query_one("#guests-table", DataTable).row_count > 0)
        cells = _column(app, "#guests-table")
        assert all(isinstance(c, Text) for c in cells)
        assert sorted(c.plain for c in cells) == sorted(escape(n) for n in HOSTILE_NAMES)
        screen = _screen_text(app)
        _assert_clean(screen)
        for name in ("[bold red]alarm", "..", "-rf", "$(touch x)", "quote'\"<&>", "tab\\there"):
            assert name in screen, name
        assert "\\u202eevil.exe" in screen and "zero\\u200bwidth\\u200d" in screen
        assert "del\\x7fc1\\x85" in screen

        await pilot.press("r")
        await settle(pilot)
        await wait_for(pilot, lambda: app.query_one("#archive-table", DataTable).row_count > 0)
        cells = _column(app, "#archive-table")
        everyone = (*HOSTILE_NAMES, *ARCHIVE_ONLY)
        assert all(isinstance(c, Text) for c in cells)
        assert sorted(c.plain for c in cells) == sorted(escape(n) for n in everyone)
        screen = _screen_text(app)
        _assert_clean(screen)
        for name in MARKUP:
            assert name in screen, name
        assert "\\x1b[31mred\\x1b[0m" in screen

        await pilot.press("l")
        await settle(pilot)
        await pilot.press("f")  # the newest run: the backup of every hostile guest
        await settle(pilot)
        # The log file's guest field is one word: its spaces are written \x20.
        await wait_for(pilot, lambda: "[bold\\x20red]alarm: ok" in _screen_text(app), timeout=15)
        screen = _screen_text(app)
        _assert_clean(screen)
        assert "tab\\there" in screen


async def _restore_row(pilot: Any, app: GuestsafeApp, guest: str) -> None:
    """Take ``guest``'s row in the archive table and restore it under the suggested ID."""
    versions = app.restore_pane._versions
    row = next(i for i, v in enumerate(versions) if v.guest == guest)
    table = app.query_one("#archive-table", DataTable)
    table.focus()
    table.move_cursor(row=row)
    await pilot.pause()
    await pilot.press("enter")  # take this version; focus goes to New ID
    await pilot.pause()
    await pilot.press("enter")
    await pilot.pause()
    if isinstance(app.screen, MacClashScreen):
        await pilot.press("f2")  # new MACs where they clash
    await wait_for(pilot, lambda: not isinstance(app.screen, MacClashScreen))
    await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
    await settle(pilot)


@pytest.mark.parametrize(
    ("guest", "clone"),
    [("\x1b[31mred\x1b[0m", "[31mred[0m-v1"), ("\u202eevil.exe", "evil.exe-v1")],
)
async def test_restore_form_shows_the_name_escaped_and_restores_the_real_guest(
    hostile_engine: Engine, guest: str, clone: str
) -> None:
    app = GuestsafeApp(hostile_engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        await wait_for(pilot, lambda: app.query_one("#archive-table", DataTable).row_count > 0)
        await _restore_row(pilot, app, guest)

        screen = _screen_text(app)
        _assert_clean(screen)
        assert not [n for n in app._notifications if n.severity == "error"], [
            str(n.message) for n in app._notifications
        ]
        assert any("restore successful" in str(n.message) for n in app._notifications)
    assert hostile_engine.hv.exists(clone)
