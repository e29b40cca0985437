"""Issue 14 in the console: "Boot now" (key b) boots the chosen version in a worker."""

from __future__ import annotations

from typing import Any

import pytest
from test_console_flows import SIZE, notifications, select_row
from textual.widgets import DataTable
from tui_support import settle, wait_for

from guestsafe.engine.api import BootRecord, Engine, RestorePlan, RestoreResult
from guestsafe.engine.archive.in_use import write_record
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.mac_modal import MacClashScreen

pytestmark = pytest.mark.tui


async def test_key_b_boots_the_chosen_version_and_reports_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert engine.run_job("mail-weekly").ok
    booted: list[RestorePlan] = []

    def boot(plan: RestorePlan, **kwargs: Any) -> RestoreResult:
        # The demo's test driver runs no QEMU: the console's side is what is tested here.
        booted.append(plan)
        version = plan.version
        record = BootRecord(
            plan.new_name, "u-1", version.guest, version.number,
            str(version.path.parent.parent), str(version.path), {},
        )  # fmt: skip
        write_record(engine.paths.state_dir, record)
        return RestoreResult(plan.new_name, "u-1", ["52:54:00:00:00:01"], [], True)

    def restore(plan: RestorePlan, **kwargs: Any) -> RestoreResult:
        raise AssertionError("Boot now must not copy the version")

    monkeypatch.setattr(engine, "boot", boot)
    monkeypatch.setattr(engine, "restore", restore)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        row = next(i for i, v in enumerate(app.restore_pane._versions) if v.guest == "mail")
        await select_row(pilot, "#archive-table", str(row))
        app.restore_pane.focus_table()

        await pilot.press("b")
        # The running original holds the version's MAC: asked as for a restore.
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen), timeout=30)
        await pilot.press("f2")
        await wait_for(pilot, lambda: bool(booted) and not app.restore_pane.busy, timeout=30)
        await settle(pilot)

        assert booted[0].version.guest == "mail" and booted[0].new_name == "mail-v1"
        assert any("instant boot successful: mail-v1" in n for n in notifications(app))
        # The version it runs on says so in the table.
        table = app.restore_pane.query_one("#archive-table", DataTable)
        await wait_for(pilot, lambda: "in use by mail-v1" in _cells(table, row), timeout=30)


def _cells(table: DataTable[Any], row: int) -> str:
    return " ".join(str(cell) for cell in table.get_row_at(row))
