"""Issue 14 in the console: the Restore tab's archive list shows each version's last
restore test ("boot ok 14 s", "boot FAILED", blank when never tested)."""

from __future__ import annotations

from typing import Any

import pytest
from test_console_flows import SIZE
from textual.widgets import DataTable
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine, RestoreTest
from guestsafe.engine.archive.restore_record import write_restore_test
from guestsafe.tui.app import GuestsafeApp

pytestmark = pytest.mark.tui


async def test_the_archive_list_shows_the_last_restore_test(engine: Engine) -> None:
    assert engine.run_job("mail-weekly").ok
    assert engine.run_job("mail-weekly").ok
    versions = sorted(
        (v for dest in engine.destinations() for v in engine.versions(dest, "mail")),
        key=lambda v: v.number,
    )
    passed = RestoreTest(ok=True, at="2026-12-03T02:10:00+00:00", sign="console", seconds=13.6)
    failed = RestoreTest(ok=False, at="2026-12-03T02:10:00+00:00", sign=None, seconds=None)
    write_restore_test(versions[0].path, failed)
    write_restore_test(versions[1].path, passed)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        table = app.restore_pane.query_one("#archive-table", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, timeout=30)

        cells = {
            (v.guest, v.number): _last_cell(table, i)
            for i, v in enumerate(app.restore_pane._versions)
        }
        assert cells[("mail", versions[0].number)] == "boot FAILED"
        assert cells[("mail", versions[1].number)] == "boot ok 14 s"
        assert {c for (guest, _), c in cells.items() if guest != "mail"} <= {""}


def _last_cell(table: DataTable[Any], row: int) -> str:
    return str(table.get_row_at(row)[-1])
