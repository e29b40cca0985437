"""Issue 15, the console's part: what operators expect of a daily backup.

Calendar retention edited with a live prune preview, weekdays as boxes with the
next runs, a help screen from the real bindings, tab keys in the tab bar, the
Restore tab's guest filter, starting the restored guest, and a Jobs table that
fits 80 columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from rich.text import Text
from textual.widgets import Checkbox, DataTable, Input, Static, Tab
from tui_support import FIXED_NOW, freeze, settle, type_into, wait_for, write_fixed_result

from guestsafe.engine.api import Candidate, Engine, Job, RetentionPolicy
from guestsafe.engine.hypervisor.domain_xml import RUNNING
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.help_screen import HelpScreen
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.jobs_pane import fitting_columns
from guestsafe.tui.mac_modal import MacClashScreen
from guestsafe.tui.model import text as plain
from guestsafe.tui.model.job_form import JobFormValues, check_job, next_runs_text
from guestsafe.tui.model.prune_preview import (
    GuestHistory,
    policy_of,
    preview_lines,
    simulated_series,
)

pytestmark = pytest.mark.tui

SIZE = (100, 32)
NARROW = (80, 24)


def static_text(app: GuestsafeApp, selector: str) -> str:
    content = app.screen.query_one(selector, Static).content
    return content.plain if isinstance(content, Text) else str(content)


async def open_form(pilot: Any, key: str) -> JobFormScreen:
    pilot.app.query_one("#jobs-table", DataTable).focus()
    await pilot.press("home", key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, JobFormScreen)
    return screen


# --- the models ------------------------------------------------------------------


def test_the_simulated_series_answers_as_the_engine_retention_does() -> None:
    now = datetime(2025, 1, 6, 2, 0, tzinfo=UTC)  # a Monday
    series = simulated_series(now)
    assert len(series) == 400 and series[0].started == now
    lines = preview_lines([], policy_of({"keep": "2", "keep_weekly": "3"}), now, UTC)
    assert "simulated" in lines[0]
    # Newest two; the newest of this week (Mon 01-06) and of the two ISO weeks before
    # (Sundays 01-05 and 12-29): 01-06 and 01-05 are shared, so 3 versions stay.
    assert lines[1] == "  keeps 3 of 400, 397 would go"
    assert lines[2] == "  last      2: 01-06 01-05"
    assert lines[3] == "  weekly    3: 01-06 01-05 12-29"


def test_real_versions_name_the_ones_that_would_go() -> None:
    versions = [Candidate(n, datetime(2025, 1, n, 2, 0, tzinfo=UTC), good=True) for n in (3, 2, 1)]
    history = [GuestHistory("web1", versions)]
    lines = preview_lines(history, policy_of({"keep": "1"}), FIXED_NOW, UTC)
    assert lines[1:] == [
        "web1:",
        "  keeps 1 of 3, 2 would go",
        "  last      1: #3:01-03",
        "  would go: #2:01-02 #1:01-01",
    ]


def test_the_preview_says_why_it_cannot_answer() -> None:
    assert "whole numbers" in preview_lines([], policy_of({"keep": "x"}), FIXED_NOW)[0]
    assert "every rule is 0" in preview_lines([], RetentionPolicy(), FIXED_NOW)[0]


def test_calendar_fields_become_the_job_rules(tmp_path: Any) -> None:
    values = JobFormValues(
        name="daily",
        guests="web1",
        destination=str(tmp_path),
        keep="0",
        keep_daily="7",
        keep_weekly="4",
        keep_monthly="6",
    )
    job, problems = check_job(values, existing=[], known_guests=None)
    assert problems == []
    assert (job.keep, job.keep_daily, job.keep_weekly, job.keep_monthly, job.keep_yearly) == (
        0,
        7,
        4,
        6,
        0,
    )
    assert JobFormValues.from_job(job).keep_daily == "7"
    assert plain.keep_summary(job) == "d7 w4 m6"
    assert plain.keep_summary(Job("j", ["a"], tmp_path, keep=7)) == "7"
    bad = JobFormValues(name="d", guests="web1", destination=str(tmp_path), keep_daily="-1")
    assert "keep_daily" in {p.field for p in check_job(bad, existing=[], known_guests=None)[1]}


def test_next_runs_text_says_why_there_are_none() -> None:
    assert next_runs_text([], None, False) == "next: manual only (no time set)"
    assert "fix the time" in next_runs_text([], "25:00", True)
    assert next_runs_text([FIXED_NOW], "01:00", False) == "next: 01:00 on Mon 01-06"


def test_columns_that_do_not_fit_are_left_to_the_panel() -> None:
    row = {c: Text("x" * 8) for c in ("Job", "Guests", "Keep", "Next run", "Last result")}
    row |= {c: Text("x" * 8) for c in ("Took", "Size", "Destination / device")}
    assert fitting_columns([row], 200)[-1] == "Destination / device"
    narrow = fitting_columns([row], 45)
    assert narrow == ["Job", "Guests", "Keep", "Last result"]  # 4 x 10 + the edge


# --- the console -----------------------------------------------------------------


async def test_help_lists_the_screen_keys_and_keys_toml_moves(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)
    keys_file = engine.paths.config_file.parent / "keys.toml"
    keys_file.write_text('[keys]\n"jobs.start" = "f9"\n"app.restore" = "f3"\n')
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        labels = [str(tab.label) for tab in app.query(Tab)]
        assert labels == ["Jobs (j)", "Restore (f3)", "Log (l)", "Guests (g)"]
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one("#help-table", DataTable)
        rows = {str(table.get_row_at(i)[2]): table.get_row_at(i) for i in range(table.row_count)}
        assert str(rows["jobs.start"][0]) == "f9 (keys.toml)"
        assert str(rows["jobs.new"][0]) == "n"
        assert str(rows["app.restore"][0]) == "f3 (keys.toml)"
        assert {"app.quit", "app.help", "jobs.delete"} <= set(rows)
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, HelpScreen)
        # In the job form, F1 lists the form's keys; ? stays a character to type.
        await open_form(pilot, "n")
        await pilot.press("question_mark")
        assert app.screen.query_one("#f-name", Input).value == "?"
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one("#help-table", DataTable)
        ids = {str(table.get_row_at(i)[2]) for i in range(table.row_count)}
        assert {"form.save", "form.cancel"} <= ids and "jobs.start" not in ids


async def test_weekday_boxes_show_the_next_runs_and_save(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)  # Monday 2025-01-06 01:00 UTC; nightly runs at 02:00
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        form = await open_form(pilot, "e")
        assert static_text(app, "#next-runs") == "next: 02:00 on Mon 01-06, Tue 01-07, Wed 01-08"
        for day in ("wed", "sat"):
            form.query_one(f"#wd-{day}", Checkbox).focus()
            await pilot.press("space")
        await settle(pilot)
        assert static_text(app, "#next-runs") == "next: 02:00 on Wed 01-08, Sat 01-11, Wed 01-15"
        await type_into(pilot, "#f-time", "")
        await settle(pilot)
        assert static_text(app, "#next-runs") == "next: manual only (no time set)"
        await type_into(pilot, "#f-time", "23:15")
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, JobFormScreen))
        await settle(pilot)
        saved = engine.job("nightly")
        assert (saved.schedule.time, saved.schedule.weekdays) == ("23:15", ["wed", "sat"])


async def test_prune_preview_follows_the_numbers_over_the_archive(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    freeze(monkeypatch)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_form(pilot, "n")  # a new job: nothing backed up yet
        assert "simulated" in static_text(app, "#prune-preview")
        await type_into(pilot, "#f-keep_daily", "7")
        await settle(pilot)
        preview = static_text(app, "#prune-preview")
        assert "keeps 7 of 400" in preview and "daily     7:" in preview
        await pilot.press("escape")
        await settle(pilot)
    # Two real backups: the edited job's preview lists its versions.
    assert engine.run_job("nightly").ok and engine.run_job("nightly").ok
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_form(pilot, "e")
        preview = static_text(app, "#prune-preview")
        assert "versions in the archive" in preview and "web1:" in preview and "db1:" in preview
        assert "keeps 2 of 2, 0 would go" in preview
        await type_into(pilot, "#f-keep", "1")
        await settle(pilot)
        preview = static_text(app, "#prune-preview")
        assert "keeps 1 of 2, 1 would go" in preview and "would go: #1:" in preview
        # Only the shown figures changed: the job on disk is as it was.
        assert engine.job("nightly").keep == 3


async def test_the_guest_filter_narrows_the_archive_list(engine: Engine) -> None:
    assert engine.run_job("nightly").ok
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await wait_for(pilot, lambda: len(app.restore_pane.versions) == 2)
        await settle(pilot)
        await pilot.press("slash", "d", "b")
        await settle(pilot)
        pane = app.restore_pane
        assert [v.guest for v in pane.versions] == ["db1"]
        assert app.query_one("#archive-table", DataTable).row_count == 1
        assert "1 shown of 2 versions" in static_text(app, "#archive-status")
        await pilot.press("enter")  # back to the table, the filter stays
        await settle(pilot)
        assert isinstance(app.focused, DataTable)
        assert app.query_one("#r-guest", Input).value == "db1"
        await pilot.press("slash", "backspace", "backspace")
        await settle(pilot)
        assert len(pane.versions) == 2


async def test_the_restored_guest_can_be_started(engine: Engine) -> None:
    assert engine.run_job("nightly").ok
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await wait_for(pilot, lambda: app.restore_pane.versions)
        await settle(pilot)
        await type_into(pilot, "#r-guest", "web1")
        await type_into(pilot, "#r-version", "1")
        await type_into(pilot, "#r-new", "web1-started")
        app.query_one("#r-start", Checkbox).focus()
        await pilot.press("space")
        app.query_one("#r-submit").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await pilot.press("f2")  # new MACs
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        await wait_for(
            pilot, lambda: "web1-started" in {g.name for g in engine.guests()}, timeout=60
        )
        await settle(pilot)
    started = next(g for g in engine.guests() if g.name == "web1-started")
    assert started.state == RUNNING


async def test_jobs_table_fits_80_columns(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch)
    write_fixed_result(engine)
    app = GuestsafeApp(engine)
    async with app.run_test(size=NARROW) as pilot:
        await settle(pilot)
        table = app.query_one("#jobs-table", DataTable)
        shown = [str(c.label) for c in table.columns.values()]
        assert shown[:2] == ["Job", "Guests"] and "Last result" in shown and "Keep" in shown
        assert sum(c.get_render_width(table) for c in table.columns.values()) <= NARROW[0]
        await pilot.press("down")  # mail-weekly: its last run took 41 s
        await settle(pilot)
        detail = static_text(app, "#job-detail")
        assert "took 41s" in detail and "mail to " in detail
    app = GuestsafeApp(engine)
    async with app.run_test(size=(140, 32)) as pilot:
        await settle(pilot)
        table = app.query_one("#jobs-table", DataTable)
        assert [str(c.label) for c in table.columns.values()][-3:] == [
            "Took",
            "Size",
            "Destination / device",
        ]
        assert str(table.get_cell("mail-weekly", "Took")) == "41s"
