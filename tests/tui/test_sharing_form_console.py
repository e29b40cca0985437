"""Item 2's notice in the job form: do versions on the destination share blocks?"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static
from tui_support import settle, type_into, wait_for

from guestsafe.engine import demo
from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.job_form import JobFormScreen

SIZE = (100, 32)


async def _open_form(pilot: Any) -> JobFormScreen:
    await settle(pilot)
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, JobFormScreen)
    return screen


async def test_the_form_says_full_copies_and_suggests_xfs_or_btrfs(engine: Engine) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(pilot)
        hint = form.query_one("#sharing-hint", Static)
        assert not hint.display  # only at the destination and device fields

        await type_into(pilot, "#f-destination", "/dev/shm")  # tmpfs: no reflink
        await wait_for(pilot, lambda: "full copies" in str(hint.render()))
        assert hint.display and "XFS or btrfs" in str(hint.render())

        await type_into(pilot, "#f-device", demo.DEMO_DEVICE.spec)  # the demo's ext4 disk
        await wait_for(pilot, lambda: demo.DEMO_DEVICE.spec in str(hint.render()))
        assert "full copies" in str(hint.render())
