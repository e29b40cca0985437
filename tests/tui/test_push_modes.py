"""The console's side of stop-short and snapshot: the downtime on show, the crash label."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Static
from tui_support import settle

from guestsafe.engine.api import Engine
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.events import GuestDowntime, GuestOutcome, PhaseChanged
from guestsafe.engine.jobs.model import Job
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.model.job_form import JobFormValues, build_job
from guestsafe.tui.model.run_tracker import RunTracker
from guestsafe.tui.restore_pane import COLUMNS
from guestsafe.tui.run_progress import RunProgressPanel

pytestmark = pytest.mark.tui

STOP_SHORT_LOG = (
    "2025-01-06T02:00:00+00:00 PHASE web1 shutdown",
    "2025-01-06T02:00:02+00:00 PHASE web1 start",
    "2025-01-06T02:00:03+00:00 INFO web1 guest is running again; QEMU copies its disks "
    "meanwhile (downtime 2.9 s)",
    "2025-01-06T02:00:03+00:00 DOWNTIME web1 2.9 s",
    "2025-01-06T02:00:03+00:00 PHASE web1 backup",
    "2025-01-06T02:00:04+00:00 PROGRESS web1 backup 1073741824 8589934592",
)


def test_the_downtime_line_of_a_log_reaches_the_progress_header() -> None:
    tracker = RunTracker()
    for line in STOP_SHORT_LOG[:2]:
        tracker.feed_line(line)
    assert tracker.view.downtime is None  # not known while the guest is down

    for line in STOP_SHORT_LOG[2:]:
        tracker.feed_line(line)

    assert tracker.view.downtime == "2.9 s"
    assert (tracker.view.phase, tracker.view.item) == ("backup", "backup")


def test_the_downtime_of_events_and_results_is_noted_per_guest() -> None:
    tracker = RunTracker()
    tracker.feed_event(PhaseChanged("web1", "start"), 0.0)
    tracker.feed_event(GuestDowntime("web1", 1.5), 1)
    assert tracker.view.downtime == "1.5 s"
    tracker.feed_event(PhaseChanged("db1", "shutdown"), 2.0)
    assert tracker.view.downtime is None  # db1's is not known yet
    tracker.feed_event(GuestOutcome("db1", True, 1, 3.0, 0, 9.0, "ok: downtime 3.0 s"), 3.0)
    assert tracker.view.downtime == "3.0 s"
    failed = GuestOutcome("db1", False, None, None, 0, 9.0, "failed: x; downtime none")
    tracker.feed_event(failed, 4.0)
    assert tracker.view.downtime == "3.0 s"  # "none" is no measurement


class _Panel(App[None]):
    def compose(self) -> ComposeResult:
        yield RunProgressPanel()


async def test_the_progress_header_shows_the_downtime() -> None:
    tracker = RunTracker()
    for line in STOP_SHORT_LOG:
        tracker.feed_line(line)
    app = _Panel()
    async with app.run_test() as pilot:
        app.query_one(RunProgressPanel).show(tracker.view)
        await pilot.pause()
        header = str(app.query_one("#run-phase", Static).render())
    assert "downtime: 2.9 s" in header and "phase: backup" in header


def test_the_job_form_keeps_the_fallback_setting(tmp_path: Path) -> None:
    job = Job("nightly", ["web1"], tmp_path, mode="stop-short", fallback_to_stop=True)

    values = JobFormValues.from_job(job)
    rebuilt, problems = build_job(values)

    assert values.fallback_to_stop is True
    assert problems == [] and rebuilt.fallback_to_stop is True


async def test_the_archive_list_marks_snapshot_versions_crash_consistent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert engine.run_job("nightly").ok
    real = engine.versions

    def versions(destination: Path, guest: str | None = None) -> list[VersionInfo]:
        found = real(destination, guest)
        return [replace(v, mode="snapshot") if v.guest == "web1" else v for v in found]

    monkeypatch.setattr(engine, "versions", versions)
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        table = app.query_one("#archive-table", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
    mode = COLUMNS.index("Mode")
    shown = {str(row[0]): str(row[mode]) for row in rows}
    assert shown == {"web1": "crash-consistent", "db1": "stop"}
