"""Issue 15 in the console: the job form writes and shows all guests, exclude, mail to,
the I/O class and the bandwidth limit; a bad limit is refused at its field.

The form's model (what the fields make of a job) is in test_form_daily_keys.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Checkbox, DataTable, Input, RadioButton, RadioSet, Static
from tui_support import fill, settle, type_into, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.job_form import JobFormScreen

pytestmark = pytest.mark.tui

SIZE = (100, 32)
MIB = 1024 * 1024


async def open_form(pilot: Any, key: str) -> JobFormScreen:
    await settle(pilot)
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, JobFormScreen)
    return screen


async def tick(pilot: Any, selector: str) -> None:
    pilot.app.screen.query_one(selector, Checkbox).focus()
    await pilot.pause()
    await pilot.press("space")
    await pilot.pause()


def text_of(form: JobFormScreen, selector: str) -> str:
    return str(form.query_one(selector, Static).render())


async def test_an_all_guests_job_with_the_daily_keys_is_saved_and_shown_again(
    engine: Engine, tmp_path: Path
) -> None:
    destination = tmp_path / "backups"
    destination.mkdir()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form(pilot, "n")
        await type_into(pilot, "#f-name", "everyone")
        # Before the tick the exclude field is off; after it the guest list is.
        assert form.query_one("#f-exclude", Input).disabled
        await tick(pilot, "#f-all_guests")
        assert form.query_one("#f-guests", Input).disabled
        assert not form.query_one("#f-exclude", Input).disabled
        assert text_of(form, "#guests-hint") == "covers now: db1, mail, web1"
        await type_into(pilot, "#f-exclude", "db*")
        assert text_of(form, "#guests-hint") == "covers now: mail, web1; excluded: db1"
        await fill(pilot, "#f-destination", str(destination))
        await type_into(pilot, "#f-mail_to", "ops@example.org, night@example.org")
        form.query_one("#f-ionice", RadioSet).focus()
        await pilot.press("right", "enter")
        await type_into(pilot, "#f-bwlimit", "100 MiB/s")
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, JobFormScreen))
        await settle(pilot)

        table = tomllib.loads(engine.paths.config_file.read_text())["jobs"]["everyone"]
        assert table["guests"] == "all"
        assert table["exclude"] == ["db*"]
        assert table["mail_to"] == ["ops@example.org", "night@example.org"]
        assert table["ionice"] == "best-effort"
        assert table["bwlimit"] == "100 MiB/s"
        saved = engine.job("everyone")
        assert (saved.all_guests, saved.bwlimit) == (True, 100 * MIB)

        # Reopened, the form shows what was saved.
        jobs_table = app.query_one("#jobs-table", DataTable)
        jobs_table.focus()
        names = [str(key.value) for key in jobs_table.rows]
        await pilot.press("home", *["down"] * names.index("everyone"))
        form = await open_form(pilot, "e")
        assert form.query_one("#f-all_guests", Checkbox).value
        assert form.query_one("#f-guests", Input).disabled
        assert form.query_one("#f-exclude", Input).value == "db*"
        assert form.query_one("#f-mail_to", Input).value == "ops@example.org, night@example.org"
        assert form.query_one("#ionice-best-effort", RadioButton).value
        assert form.query_one("#f-bwlimit", Input).value == "100 MiB/s"
        assert text_of(form, "#guests-hint") == "covers now: mail, web1; excluded: db1"
        assert not form.query_one("#e-bwlimit", Static).display


async def test_a_bad_bwlimit_is_refused_at_its_field_and_nothing_is_saved(
    engine: Engine, tmp_path: Path
) -> None:
    before = engine.paths.config_file.read_bytes()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form(pilot, "n")
        await fill(pilot, "#f-name", "capped")
        await fill(pilot, "#f-guests", "web1")
        await fill(pilot, "#f-destination", str(tmp_path))
        await type_into(pilot, "#f-bwlimit", "fast")
        await pilot.press("f2")
        await settle(pilot)
        assert app.screen is form, "an invalid job must keep the form open"
        error = form.query_one("#e-bwlimit", Static)
        assert error.display
        assert 'bwlimit must be a rate like "100 MiB/s"' in str(error.render())
        assert form.query_one("#f-bwlimit", Input).has_class("invalid")
        assert form.query_one("#f-bwlimit", Input).has_focus
        # Only the bad field says anything.
        shown = [s.id for s in form.query(".field-error").results(Static) if s.display]
        assert shown == ["e-bwlimit"]
    assert engine.paths.config_file.read_bytes() == before
