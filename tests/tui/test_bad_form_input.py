"""Issue 7, case 14 in the console: what tests/tui/test_console_flows.py does not cover.

A device path that is a regular file is refused at its field, and a jobs.toml
that does not load is shown as its one-line error while nothing can be started.
keep=0, time 25:00 and a character device are in test_console_flows.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Static
from tui_support import fill, settle, type_into, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.job_form import JobFormScreen

pytestmark = pytest.mark.tui

SIZE = (100, 32)


@pytest.fixture
def regular_file_in_dev() -> Iterator[Path]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/dev")
    path = base / f"guestsafe-test-{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"not a disk\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


async def test_a_device_that_is_a_regular_file_is_refused_at_its_field(
    engine: Engine, tmp_path: Path, regular_file_in_dev: Path
) -> None:
    before = engine.jobs()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, JobFormScreen))
        form = app.screen
        await fill(pilot, "#f-name", "fresh")
        await fill(pilot, "#f-guests", "web1")
        await fill(pilot, "#f-destination", str(tmp_path))
        await type_into(pilot, "#f-device", str(regular_file_in_dev))
        await pilot.press("f2")
        await settle(pilot)
        assert app.screen is form, "an invalid job must keep the form open"
        error = form.query_one("#e-device", Static)
        assert error.display
        assert f"device {regular_file_in_dev} is not a block device" in str(error.render())
    assert engine.jobs() == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[jobs.nightly]\nguests = ["web1"\n', "not valid TOML"),
        ('[jobs.nightly]\nguests = ["web1"]\ndestination = "/srv"\nkepp = 3\n', "'kepp'"),
        ('[jobs.nightly]\nguests = ["web1"]\ndestination = "/srv"\nkeep = 0\n', "keep must"),
        ('[jobs.nightly]\nguests = ["web1"]\ndestination = "/srv"\ntime = "25:00"\n', "time"),
    ],
)
async def test_a_config_that_does_not_load_is_shown_and_nothing_starts(
    engine: Engine, text: str, expected: str
) -> None:
    engine.paths.config_file.write_text(text)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        await settle(pilot)
        modal: Any = app.screen
        message = str(modal.query_one("#error-message", Static).render())
        assert str(engine.paths.config_file) in message and expected in message
        assert "\n" not in modal._message
        await pilot.press("escape")
        await settle(pilot)
        assert app.query_one("#jobs-table", DataTable).row_count <= 1  # at most a hint row
        await pilot.press("s")  # Start now: there is no job to start
        await settle(pilot)
        assert app.running_job is None
    assert all(guest.state == "running" for guest in engine.guests() if guest.name != "mail")
    log_dir = engine.paths.log_dir
    assert not log_dir.exists() or list(log_dir.glob("*.log")) == []
