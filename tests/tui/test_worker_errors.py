"""Each part of the console that starts workers shows their failures in the ErrorModal.

For every owner of workers (the app, each tab, the job form) one engine call it
makes in a worker fails with an error the engine never meant to raise; the
operator sees it in the ErrorModal, and the console keeps running.
"""

from __future__ import annotations

from typing import Any

import pytest
from textual.widgets import Static
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.job_form import JobFormScreen

pytestmark = pytest.mark.tui

SIZE = (100, 32)


def breaks(name: str) -> Any:
    def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError(f"{name} broke")

    return broken


@pytest.mark.parametrize(
    ("owner", "call", "keys"),
    [
        ("JobsPane", "last_results", ()),
        ("GuestsPane", "guests", ()),
        ("RestorePane", "destinations", ()),
        ("LogPane", "log_files", ()),
        ("JobFormScreen", "devices", ("n",)),
    ],
)
async def test_a_failing_worker_shows_in_the_error_modal(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    owner: str,
    call: str,
    keys: tuple[str, ...],
) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        if keys:
            await settle(pilot)
        monkeypatch.setattr(engine, call, breaks(call))
        if keys:
            await pilot.press(*keys)
        else:
            app.action_refresh()  # the tabs load again
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        await settle(pilot)  # the modal drawn
        text = str(app.screen.query_one("#error-message", Static).render())
        assert text == f"RuntimeError: {call} broke"
        if owner == "JobFormScreen":
            assert isinstance(app.screen_stack[-2], JobFormScreen)
        assert app.is_running


async def test_the_apps_own_worker_shows_in_the_error_modal(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Engine, "hostname", property(breaks("hostname")))
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        await settle(pilot)  # the modal drawn
        text = str(app.screen.query_one("#error-message", Static).render())
        assert text == "RuntimeError: hostname broke"
        assert app.is_running
