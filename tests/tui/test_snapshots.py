"""Snapshot tests of every screen and modal, on fixed demo data.

Everything shown is pinned: the sandbox path (/tmp/guestsafe-snapshot-demo), the
host name, the time zone, version dates and sizes, new MACs, and the log file.
Regenerate with ``pytest -m tui tests/tui --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from textual.pilot import Pilot
from tui_support import (
    fixed_space,
    fixed_versions,
    freeze,
    fresh_sandbox,
    settle,
    type_into,
    wait_for,
    write_fixed_log,
    write_fixed_result,
)

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.confirm_modal import ConfirmModal
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.help_screen import HelpScreen
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.mac_modal import MacClashScreen

pytestmark = pytest.mark.tui

WIDE = (100, 32)
NARROW = (80, 24)
Compare = Callable[..., bool]
RunBefore = Callable[[Pilot[Any]], Awaitable[None]]


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    freeze(monkeypatch)
    engine = Engine.demo(fresh_sandbox())
    write_fixed_result(engine)
    yield engine
    engine.close()


@pytest.fixture
def archived(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The engine after a real backup of the nightly job, shown with fixed dates and sizes."""
    assert engine.run_job("nightly").ok
    # The run's own log and result carry today's date; the snapshots must not.
    shutil.rmtree(engine.paths.log_dir)
    write_fixed_result(engine)
    (engine.paths.state_dir / "results" / "nightly.json").unlink()
    monkeypatch.setattr(engine, "versions", fixed_versions(engine))
    monkeypatch.setattr("guestsafe.tui.restore_pane.space_of", fixed_space)
    return engine


def app_of(engine: Engine, theme: str | None = None) -> GuestsafeApp:
    return GuestsafeApp(engine, theme=theme)


def steps(*keys: str, until: Callable[[GuestsafeApp], object] | None = None) -> RunBefore:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        if keys:
            await pilot.press(*keys)
        if until is not None:
            app = pilot.app
            assert isinstance(app, GuestsafeApp)
            await wait_for(pilot, lambda: until(app))
        await settle(pilot)

    return run_before


# --- Jobs ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_jobs(snap_compare: Compare, engine: Engine, size: tuple[int, int]) -> None:
    # The second job's last run failed: its outcome shows under the table.
    assert snap_compare(app_of(engine), terminal_size=size, run_before=steps("down"))


@pytest.mark.parametrize("theme", ["light", "high-contrast"])
def test_jobs_themes(snap_compare: Compare, engine: Engine, theme: str) -> None:
    assert snap_compare(app_of(engine, theme), terminal_size=WIDE, run_before=steps("down"))


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_job_form(snap_compare: Compare, engine: Engine, size: tuple[int, int]) -> None:
    run_before = steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))
    assert snap_compare(app_of(engine), terminal_size=size, run_before=run_before)


def test_job_form_with_errors(snap_compare: Compare, engine: Engine) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        await type_into(pilot, "#f-name", "weekly")
        await type_into(pilot, "#f-guests", "web1, [b]ghost[/b]")
        await type_into(pilot, "#f-keep", "0")
        await type_into(pilot, "#f-time", "25:00")
        await pilot.press("f2")
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=WIDE, run_before=run_before)


def test_edit_job_snapshot_mode(snap_compare: Compare, engine: Engine) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("e", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        screen = pilot.app.screen
        screen.query_one("#f-mode").focus()
        await pilot.press("down", "down", "enter")  # snapshot: the warning shows
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=WIDE, run_before=run_before)


def test_job_form_prune_preview(snap_compare: Compare, engine: Engine) -> None:
    """Calendar rules over the simulated 400 days: what each rule keeps."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        await type_into(pilot, "#f-keep", "3")
        await type_into(pilot, "#f-keep_daily", "7")
        await type_into(pilot, "#f-keep_weekly", "4")
        await type_into(pilot, "#f-keep_monthly", "12")
        await type_into(pilot, "#f-keep_yearly", "2")
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=WIDE, run_before=run_before)


def test_job_form_weekdays(snap_compare: Compare, engine: Engine) -> None:
    """Monday and Friday ticked: the next three runs under the boxes."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("e", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        for day in ("mon", "fri"):
            pilot.app.screen.query_one(f"#wd-{day}").focus()
            await pilot.press("space")
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=NARROW, run_before=run_before)


def test_job_form_all_guests(snap_compare: Compare, engine: Engine) -> None:
    """All guests ticked at 80x24: the guest list off, exclude on, whom the job covers now."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        pilot.app.screen.query_one("#f-all_guests").focus()
        await pilot.press("space")
        await type_into(pilot, "#f-exclude", "db*")
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=NARROW, run_before=run_before)


def test_job_form_bwlimit_error(snap_compare: Compare, engine: Engine) -> None:
    """At 80x24: mail to, the I/O class, and a bandwidth limit refused at its field."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))(pilot)
        await type_into(pilot, "#f-mail_to", "ops@example.org")
        await type_into(pilot, "#f-bwlimit", "fast")
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=NARROW, run_before=run_before)


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_help_screen(snap_compare: Compare, engine: Engine, size: tuple[int, int]) -> None:
    run_before = steps("question_mark", until=lambda app: isinstance(app.screen, HelpScreen))
    assert snap_compare(app_of(engine), terminal_size=size, run_before=run_before)


def test_confirm_start(snap_compare: Compare, engine: Engine) -> None:
    run_before = steps("s", until=lambda app: isinstance(app.screen, ConfirmModal))
    assert snap_compare(app_of(engine), terminal_size=WIDE, run_before=run_before)


def test_confirm_delete(snap_compare: Compare, engine: Engine) -> None:
    run_before = steps("d", until=lambda app: isinstance(app.screen, ConfirmModal))
    assert snap_compare(app_of(engine), terminal_size=NARROW, run_before=run_before)


# --- Restore --------------------------------------------------------------------


def restore_ready(app: GuestsafeApp) -> object:
    """The archive's versions and the external devices are both listed."""
    return app.restore_pane._versions and app.restore_pane.devices


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_restore(snap_compare: Compare, archived: Engine, size: tuple[int, int]) -> None:
    run_before = steps("r", until=restore_ready)
    assert snap_compare(app_of(archived), terminal_size=size, run_before=run_before)


def test_restore_filter(snap_compare: Compare, archived: Engine) -> None:
    """Typing a guest's name in the filter leaves only its versions."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("r", until=restore_ready)(pilot)
        await pilot.press("slash", "d", "b")
        await settle(pilot)

    assert snap_compare(app_of(archived), terminal_size=NARROW, run_before=run_before)


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_mac_modal(snap_compare: Compare, archived: Engine, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await steps("r", until=restore_ready)(pilot)
        await pilot.press("down", "enter")  # web1, version 1
        await pilot.press("home", "ctrl+k", *"web1-copy", "enter")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, MacClashScreen))
        await settle(pilot)

    assert snap_compare(app_of(archived), terminal_size=size, run_before=run_before)


# --- Log --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_log(snap_compare: Compare, engine: Engine, size: tuple[int, int]) -> None:
    write_fixed_log(engine)

    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, GuestsafeApp)
        await steps("l")(pilot)
        await pilot.press("f")
        await wait_for(pilot, lambda: app.log_pane._tracker.view.done == 5 * 1024**3)
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=size, run_before=run_before)


def test_log_idle(snap_compare: Compare, engine: Engine) -> None:
    write_fixed_log(engine)
    assert snap_compare(app_of(engine), terminal_size=NARROW, run_before=steps("l"))


# --- Guests and errors ---------------------------------------------------------------


def test_guests(snap_compare: Compare, engine: Engine) -> None:
    assert snap_compare(app_of(engine), terminal_size=WIDE, run_before=steps("g"))


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["100x32", "80x24"])
def test_error_modal(snap_compare: Compare, engine: Engine, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        pilot.app.push_screen(
            ErrorModal(
                "Backup failed",
                "Job nightly:\nweb1: failed: need 41 GiB on /srv/backup, 12 GiB free; "
                "guest is running, no version, previous versions untouched\n"
                "db1: failed: [b]not markup[/b]; guest is running, no version, previous "
                "versions untouched",
            )
        )
        await settle(pilot)

    assert snap_compare(app_of(engine), terminal_size=size, run_before=run_before)
