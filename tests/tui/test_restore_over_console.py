"""Issue 12, case 23 in the console: restore over the original asks first, truthfully."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
from test_console_flows import SIZE, notifications, select_row
from textual.widgets import Static
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.confirm_modal import ConfirmModal

pytestmark = pytest.mark.tui


def _digest(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


async def test_case_23_the_console_asks_before_restoring_over_the_original(
    engine: Engine,
) -> None:
    assert engine.run_job("mail-weekly").ok
    disk = Path(engine.hv.guest("mail").disks[0].source or "")
    backed_up = _digest(disk)
    with disk.open("r+b") as f:
        f.write(b"newer than the version\n" * 100)
    newer = _digest(disk)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        versions = app.restore_pane._versions
        row = next(i for i, v in enumerate(versions) if v.guest == "mail")
        await select_row(pilot, "#archive-table", str(row))

        await pilot.press("o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), timeout=30)
        screen = app.screen
        question = str(screen.query_one("#confirm-question", Static).render())
        detail = "".join(str(s.render()) for s in screen.query(".dialog-body").results(Static))
        assert "over mail?" in question
        assert f"{disk}: replaced; the current file is deleted after success" in detail
        assert "is kept" not in detail and "aside" not in detail
        await pilot.press("n")
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=30)
        await settle(pilot)
        assert _digest(disk) == newer
        assert any("not confirmed; nothing was changed" in n for n in notifications(app))

        await pilot.press("r")  # the restore's activity showed the Log tab
        await settle(pilot)
        await select_row(pilot, "#archive-table", str(row))
        await pilot.press("o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), timeout=30)
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        await settle(pilot)
        assert any("restore successful" in n for n in notifications(app))
    assert _digest(disk) == backed_up
    assert sorted(p.name for p in disk.parent.iterdir() if p.name.startswith(disk.name)) == [
        disk.name
    ]
