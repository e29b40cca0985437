"""The console's side of issue 5: hooks and weekdays in the job form, next runs and timers."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Static
from tui_support import FIXED_NOW, fill, freeze, settle, type_into, wait_for

from guestsafe.engine.api import Engine
from guestsafe.engine.jobs.model import Hooks, Schedule
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.model import text as fmt
from guestsafe.tui.model.job_form import JobFormValues, by_field, check_job

pytestmark = pytest.mark.tui

SIZE = (100, 32)


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    """Hook programs must sit in a root-owned directory nobody else can write."""
    path = tmp_path / "hooks"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    for name in ("freeze", "thaw"):
        program = path / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return path


# --- the model -----------------------------------------------------------------


def _values(tmp_path: Path, **changes: str) -> JobFormValues:
    base = JobFormValues(name="nightly", guests="web1", destination=str(tmp_path))
    return JobFormValues(**{**base.__dict__, **changes})


def test_hook_fields_become_argument_lists(tmp_path: Path, hook_dir: Path) -> None:
    values = _values(
        tmp_path,
        hook_pre_stop=f"{hook_dir}/freeze --all 'two words'",
        hook_post_start=f"{hook_dir}/thaw",
        hook_timeout="60",
        lock_wait="0",
    )
    job, problems = check_job(values, existing=[], known_guests=None)
    assert problems == []
    assert job.hooks == Hooks(
        {
            "pre-stop": [f"{hook_dir}/freeze", "--all", "two words"],
            "post-start": [f"{hook_dir}/thaw"],
        },
        timeout=60,
    )
    assert job.lock_wait == 0
    # And back: the form shows what the job holds.
    again = JobFormValues.from_job(job)
    assert again.hook_pre_stop == f"{hook_dir}/freeze --all 'two words'"
    assert check_job(again, existing=[], known_guests=None)[0] == job


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"hook_pre_stop": "freeze"}, "hook_pre_stop", "absolute program path"),
        ({"hook_job_end": "/bin/true 'open"}, "hook_job_end", "No closing quotation"),
        ({"hook_post_stop": "/nonexistent/hook"}, "hook_post_stop", "does not exist"),
        ({"hook_timeout": "0"}, "hook_timeout", "at least 1"),
        ({"hook_timeout": "soon"}, "hook_timeout", "whole number"),
        ({"lock_wait": "-1"}, "lock_wait", "0 or more"),
    ],
)
def test_hook_problems_land_at_their_field(
    tmp_path: Path, changes: dict[str, str], field: str, words: str
) -> None:
    _job, problems = check_job(_values(tmp_path, **changes), existing=[], known_guests=None)
    messages = by_field(problems)
    assert words in messages[field], messages


def test_world_writable_hook_is_shown_at_its_field(tmp_path: Path, hook_dir: Path) -> None:
    (hook_dir / "freeze").chmod(0o777)
    values = _values(tmp_path, hook_pre_stop=f"{hook_dir}/freeze")
    _job, problems = check_job(values, existing=[], known_guests=None)
    assert "writable by group or others" in by_field(problems)["hook_pre_stop"]


def test_editing_keeps_settings_the_form_does_not_show(engine: Engine) -> None:
    job = engine.job("nightly")
    job.schedule.randomized_delay = 900
    edited, _problems = check_job(
        JobFormValues.from_job(job), existing=[], known_guests=None, base=job
    )
    assert edited.schedule.randomized_delay == 900


def test_next_run_text() -> None:
    monday = FIXED_NOW  # 2025-01-06 01:00 UTC, a Monday
    soon = monday.replace(hour=2)
    assert fmt.next_run(soon, "installed", monday) == "Mon 02:00"
    assert fmt.next_run(soon, "missing", monday) == "Mon 02:00 no timer"
    assert fmt.next_run(soon, "outdated", monday) == "Mon 02:00 old timer"
    later = monday.replace(day=20)
    assert fmt.next_run(later, "installed", monday) == "01-20 01:00"
    assert fmt.next_run(None, "manual", monday) == "manual"


# --- the console ---------------------------------------------------------------


async def test_form_edits_weekdays_and_hooks(
    engine: Engine, hook_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.query_one("#jobs-table", DataTable)
        table.focus()
        await pilot.press("home", "e")
        await wait_for(pilot, lambda: isinstance(app.screen, JobFormScreen))
        await pilot.pause()
        await type_into(pilot, "#f-time", "02:30")
        for day in ("mon", "fri"):
            app.screen.query_one(f"#wd-{day}").focus()
            await pilot.press("space")
        await fill(pilot, "#f-hook_pre_stop", f"{hook_dir}/freeze --all")
        await fill(pilot, "#f-hook_post_start", f"{hook_dir}/thaw")
        await type_into(pilot, "#f-hook_timeout", "45")
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, JobFormScreen))
        await settle(pilot)

        job = engine.job("nightly")
        assert job.schedule == Schedule("02:30", ["mon", "fri"])
        assert job.hooks == Hooks(
            {"pre-stop": [f"{hook_dir}/freeze", "--all"], "post-start": [f"{hook_dir}/thaw"]},
            timeout=45,
        )
        # The table shows the next run at once: Monday 02:30, and no timer yet.
        cell = table.get_cell("nightly", "Next run")
        assert str(cell) == "Mon 02:30 no timer"


async def test_a_refused_hook_keeps_the_form_open(
    engine: Engine, hook_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)
    (hook_dir / "freeze").chmod(0o757)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.query_one("#jobs-table", DataTable).focus()
        await pilot.press("home", "e")
        await wait_for(pilot, lambda: isinstance(app.screen, JobFormScreen))
        await pilot.pause()
        await fill(pilot, "#f-hook_pre_stop", f"{hook_dir}/freeze")
        await pilot.press("f2")
        await settle(pilot)
        assert isinstance(app.screen, JobFormScreen)
        error = str(app.screen.query_one("#e-hook_pre_stop", Static).render())
        assert "writable by group or others" in error
    assert engine.job("nightly").hooks == Hooks()


async def test_jobs_tab_shows_an_installed_timer(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)
    engine.install_timers()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.query_one("#jobs-table", DataTable)
        assert str(table.get_cell("nightly", "Next run")) == "Mon 02:00"
        assert str(table.get_cell("mail-weekly", "Next run")) == "Sun 03:30"
        table.focus()
        await pilot.press("home")
        await settle(pilot)
        detail = str(app.query_one("#job-detail", Static).render())
        assert "Next run Mon 2025-01-06 02:00 UTC (02:00 daily); timer installed" in detail
