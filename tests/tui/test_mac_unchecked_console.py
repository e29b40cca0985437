"""A restore while a host's MACs could not be read asks first, even without a clash.

The original guest may be on the host that did not answer, so the MAC modal opens
with that host named and every interface offered, a new MAC chosen by default.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from textual.widgets import Static
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine, RestorePlan
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.mac_modal import MacClashScreen

pytestmark = pytest.mark.tui

SILENT = "node3: cannot connect to qemu+ssh://root@node3/system: Connection refused"


def _unchecked_plan(engine: Engine, new_name: str) -> RestorePlan:
    """mail's version 1 as ``new_name``: no clash among the hosts read, node3 silent."""
    assert engine.run_job("mail-weekly").ok
    archive = engine.archive(engine.job("mail-weekly").destination)
    plan = engine.plan_restore(archive, "mail", 1, new_name)
    calm = [replace(i, clash_with=None) for i in plan.interfaces]
    return replace(plan, interfaces=calm, macs_unchecked=[SILENT])


async def test_an_unanswered_host_opens_the_mac_modal_and_new_macs_are_the_default(
    engine: Engine,
) -> None:
    plan = _unchecked_plan(engine, "mail-copy")
    assert len(plan.to_settle) == 2 and not plan.clashes
    original = engine.hv.guest("mail").macs
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        app.restore_pane._planned(plan)
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await settle(pilot)
        modal = app.screen
        title = str(modal.query(".dialog-title").first(Static).render())
        assert title.startswith("MACs not checked on every host")
        note = str(modal.query_one("#mac-unchecked", Static).render())
        assert "node3" in note and "Connection refused" in note
        rows = [str(s.render()) for s in modal.query(".mac-clash").results(Static)]
        assert len(rows) == 2 and "not used on the hosts that answered" in rows[0]
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, MacClashScreen))
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
    clone = engine.hv.guest("mail-copy").macs
    assert len(clone) == 2 and not set(clone) & set(original)


async def test_cancelling_it_restores_nothing(engine: Engine) -> None:
    plan = _unchecked_plan(engine, "mail-copy")
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        app.restore_pane._planned(plan)
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await settle(pilot)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, MacClashScreen))
        await settle(pilot)
    assert not engine.hv.exists("mail-copy")
