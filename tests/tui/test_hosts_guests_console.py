"""Issue 16, hosts: the Guests tab groups the guests by host, each with its state."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp

pytestmark = pytest.mark.tui

DOWN_URI = "qemu+ssh://root@127.0.0.1:1/system"


def _rows(app: GuestsafeApp) -> list[tuple[str, str]]:
    table = app.query_one("#guests-table", DataTable)
    rows = []
    for row in range(table.row_count):
        name, state, *_ = table.get_row_at(row)
        rows.append((name.plain, state.plain))
    return rows


async def test_each_hosts_guests_are_listed_under_the_host_and_its_state(engine: Engine) -> None:
    config = engine.paths.config_file
    with config.open("a") as f:
        f.write(f'\n[hosts.t2]\nuri = "test:///default"\n\n[hosts.down]\nuri = "{DOWN_URI}"\n')
    local_guests = [g.name for g in engine.guests()]
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("g")
        table = app.query_one("#guests-table", DataTable)
        await wait_for(pilot, lambda: table.row_count > len(local_guests) + 2, timeout=30)
        rows = _rows(app)
    names = [name for name, _state in rows]
    assert names[0] == "host local" and rows[0][1] == "connected"
    assert names[1 : 1 + len(local_guests)] == [f"  {g}" for g in local_guests]
    t2 = names.index("host t2")
    assert rows[t2][1] == "connected" and names[t2 + 1] == "  test"  # the test driver's guest
    down = names.index("host down")
    assert rows[down][1].startswith("unreachable: ") and "Connection refused" in rows[down][1]
    assert down == len(rows) - 1  # an unreachable host lists no guests
