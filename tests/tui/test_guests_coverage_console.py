"""The Guests tab marks a guest that no job backs up (issue 15, item 2)."""

from __future__ import annotations

import pytest
from rich.text import Text
from textual.widgets import DataTable
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp

pytestmark = pytest.mark.tui


def _jobs_cells(app: GuestsafeApp) -> dict[str, Text]:
    table = app.query_one("#guests-table", DataTable)
    cells: dict[str, Text] = {}
    for row in range(table.row_count):
        name, *_, jobs = table.get_row_at(row)
        assert isinstance(name, Text) and isinstance(jobs, Text)
        cells[name.plain] = jobs
    return cells


async def test_a_guest_no_job_covers_is_marked_on_the_guests_tab(engine: Engine) -> None:
    engine.delete_job("mail-weekly")  # mail's only job: nothing backs it up now
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("g")
        await wait_for(pilot, lambda: app.query_one("#guests-table", DataTable).row_count > 0)
        cells = _jobs_cells(app)
        assert cells["mail"].plain == "NONE (no backup)"
        assert "bold" in str(cells["mail"].style)  # seen without colour too
        assert cells["web1"].plain == "nightly" and cells["db1"].plain == "nightly"
        assert "bold" not in str(cells["web1"].style)
