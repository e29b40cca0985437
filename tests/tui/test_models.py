"""The console's pure parts: form parsing, log tailing, progress, batching, themes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from rich.text import Text

from guestsafe import themes
from guestsafe.engine.events import LogLine, PhaseChanged, Progress
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.modes import IoClass
from guestsafe.tui import formatting as fmt
from guestsafe.tui.model import text as plain
from guestsafe.tui.model.job_form import JobFormValues, by_field, check_job
from guestsafe.tui.model.reporting import BatchingReporter
from guestsafe.tui.model.run_tracker import RunTracker
from guestsafe.tui.model.tailing import LogFollower

pytestmark = pytest.mark.tui

GIB = 1024**3


# --- the job form's text -> Job -------------------------------------------


def form(tmp_path: Path, **changes: object) -> JobFormValues:
    base = JobFormValues(name="nightly", guests="web1, db1", destination=str(tmp_path))
    return JobFormValues(**{**base.__dict__, **changes})


def test_a_good_form_is_a_job_with_no_problems(tmp_path: Path) -> None:
    values = form(tmp_path, time="02:00", weekdays="Mon fri", keep="5", mode="stop-short")
    job, problems = check_job(values, existing=[], known_guests=["web1", "db1"])
    assert problems == []
    assert job.guests == ["web1", "db1"]
    assert job.schedule == Schedule("02:00", ["mon", "fri"])
    assert (job.keep, job.mode, job.device) == (5, "stop-short", None)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"keep": "0"}, "keep", "at least 1"),
        ({"keep": "three"}, "keep", "whole number"),
        ({"time": "25:00"}, "time", "HH:MM"),
        ({"destination": ""}, "destination", "required"),
        ({"destination": "relative/dir"}, "destination", "absolute"),
        ({"guests": ""}, "guests", "at least one"),
        ({"guests": "web1, ghost"}, "guests", "'ghost' is not defined"),
        ({"weekdays": "mon, funday"}, "weekdays", "funday"),
        ({"shutdown_timeout": "0"}, "shutdown_timeout", "at least 1"),
        ({"name": "-bad"}, "name", "must be 1 to 64"),
        ({"device": "sdb1"}, "device", "/dev/..."),
    ],
)
def test_each_problem_lands_at_its_field(
    tmp_path: Path, changes: dict[str, str], field: str, words: str
) -> None:
    _job, problems = check_job(form(tmp_path, **changes), existing=[], known_guests=["web1", "db1"])
    assert words in by_field(problems)[field]


def test_a_name_taken_by_another_job_is_refused(tmp_path: Path) -> None:
    other = Job("nightly", ["web1"], tmp_path)
    _job, problems = check_job(form(tmp_path), existing=[other], known_guests=None)
    assert "taken" in by_field(problems)["name"]


def test_unlisted_guests_are_not_checked_when_the_host_cannot_be_asked(tmp_path: Path) -> None:
    _job, problems = check_job(form(tmp_path, guests="anything"), existing=[], known_guests=None)
    assert problems == []


def test_form_values_round_trip_a_job(tmp_path: Path) -> None:
    job = Job("j", ["a b", "c"], tmp_path, keep=4, schedule=Schedule("03:15", ["sun"]))
    again, problems = check_job(JobFormValues.from_job(job), existing=[], known_guests=None)
    assert problems == []
    assert again == job


def test_editing_a_job_keeps_the_keys_the_form_has_no_field_for(tmp_path: Path) -> None:
    job = Job("j", ["a"], tmp_path, mail_to=["ops@example.org"], bwlimit=50 << 20)
    job.ionice = IoClass.BEST_EFFORT
    values = replace(JobFormValues.from_job(job), keep="5")
    again, problems = check_job(values, existing=[], known_guests=None, base=job)
    assert problems == []
    assert (again.keep, again.mail_to, again.bwlimit) == (5, ["ops@example.org"], 50 << 20)
    assert again.ionice == IoClass.BEST_EFFORT


# --- tailing ------------------------------------------------------------------


def test_the_follower_returns_only_whole_lines_and_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    follower = LogFollower(path)
    assert follower.read_new() == []  # not there yet
    path.write_text("one\ntw")
    assert follower.read_new() == ["one"]
    with path.open("a") as f:
        f.write("o\nthree\n")
    assert follower.read_new() == ["two", "three"]
    path.write_text("new\n")  # rotated or rewritten: read again from the start
    assert follower.read_new() == ["new"]


def test_a_long_past_log_is_read_from_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    path.write_text("".join(f"line {i}\n" for i in range(10000)))
    lines = LogFollower(path, tail_bytes=1000).read_new()
    assert lines[-1] == "line 9999"
    assert len(lines) < 200
    assert all(line.startswith("line ") for line in lines)  # no half line at the top


# --- progress -------------------------------------------------------------------


def test_progress_lines_give_bytes_rate_and_eta() -> None:
    tracker = RunTracker()
    shown = [
        tracker.feed_line(line)
        for line in (
            "2025-01-06T02:00:00+00:00 PHASE web1 copy",
            "2025-01-06T02:00:01+00:00 PROGRESS web1 vda 1073741824 8589934592",
            "2025-01-06T02:00:05+00:00 PROGRESS web1 vda 5368709120 8589934592",
        )
    ]
    assert shown[0] is not None and shown[0].level == "PHASE"
    assert shown[1:] == [None, None]  # progress moves the bar, not the text
    view = tracker.view
    assert (view.guest, view.phase, view.item) == ("web1", "copy", "vda")
    assert (view.done, view.total) == (5 * GIB, 8 * GIB)
    assert view.rate == pytest.approx(GIB)  # 4 GiB in 4 s
    assert view.eta == pytest.approx(3.0)


def test_the_final_line_marks_the_run_done_or_failed() -> None:
    ok, bad = RunTracker(), RunTracker()
    ok.feed_line("2025-01-06T02:00:09+00:00 END - finished backup [run=backup status=ok]")
    bad.feed_line(
        "2025-01-06T02:00:09+00:00 FAILED web1 failed: guest is running, no version "
        "[version=- downtime=- bytes=0 seconds=0.0]"
    )
    bad.feed_line("2025-01-06T02:00:09+00:00 END - backup failed [run=backup status=failed]")
    assert (ok.view.finished, ok.view.ok) == ("finished backup", True)
    assert (bad.view.finished, bad.view.ok) == ("backup failed", False)


def test_events_are_shown_like_log_lines_and_escaped() -> None:
    tracker = RunTracker()
    line = tracker.feed_event(LogLine(logging.WARNING, "bell\x07 [b]x[/b]", "g\x1b"), 0.0)
    assert line is not None
    assert (line.level, line.guest, line.text) == ("WARNING", "g\\x1b", "bell\\x07 [b]x[/b]")
    assert tracker.feed_event(Progress("g", "vda", 1, 2), 1.0) is None
    tracker.feed_event(PhaseChanged("g", "define"), 2.0)
    assert tracker.view.phase == "define"


# --- batching -------------------------------------------------------------------


def test_the_reporter_batches_and_keeps_only_the_newest_progress() -> None:
    batches: list[list[object]] = []
    now = [0.0]
    reporter = BatchingReporter(batches.append, interval=0.2, clock=lambda: now[0])
    reporter(LogLine(logging.INFO, "start"))  # the first event goes at once
    for done in range(1, 1000):
        reporter(Progress("g", "vda", done, 1000))
    assert len(batches) == 1
    now[0] = 0.3
    reporter(Progress("g", "vda", 1000, 1000))
    assert len(batches) == 2
    assert batches[1] == [Progress("g", "vda", 1000, 1000)]
    reporter(LogLine(logging.INFO, "end"))
    reporter.flush()
    assert batches[-1] == [LogLine(logging.INFO, "end")]


# --- names and themes -------------------------------------------------------------


def test_names_are_literal_text_never_markup() -> None:
    shown = fmt.literal("[b]x[/b]\x1b[31m")
    assert isinstance(shown, Text)
    assert shown.plain == "[b]x[/b]\\x1b[31m"
    assert not shown.spans


def test_theme_names_and_aliases() -> None:
    assert themes.resolve_theme(None) == "guestsafe-dark"
    assert themes.resolve_theme("light") == "guestsafe-light"
    assert themes.resolve_theme("high-contrast") == "guestsafe-high-contrast"
    assert themes.resolve_theme("nord", {"nord": themes.DARK}) == "nord"
    with pytest.raises(ValueError, match="unknown theme 'neon'"):
        themes.resolve_theme("neon")
    assert "Screen" in themes.stylesheet()


def test_durations_are_short_and_stable() -> None:
    assert [plain.duration(s) for s in (5, 185, 3725)] == ["5s", "3m 05s", "1h 02m"]


# --- keys -------------------------------------------------------------------------

FORBIDDEN_KEYS = {"ctrl+s", "ctrl+m", "ctrl+h", "ctrl+i"}


def test_every_binding_has_an_id_and_avoids_keys_terminals_eat() -> None:
    from textual.binding import Binding

    from guestsafe.tui.app import GuestsafeApp
    from guestsafe.tui.confirm_modal import ConfirmModal
    from guestsafe.tui.error_modal import ErrorModal
    from guestsafe.tui.job_form import JobFormScreen
    from guestsafe.tui.jobs_pane import JobsPane
    from guestsafe.tui.log_pane import LogPane
    from guestsafe.tui.mac_modal import MacClashScreen
    from guestsafe.tui.restore_pane import RestorePane

    owners = (
        GuestsafeApp,
        ConfirmModal,
        ErrorModal,
        JobFormScreen,
        JobsPane,
        LogPane,
        MacClashScreen,
        RestorePane,
    )
    ids: list[str] = []
    for owner in owners:
        for binding in owner.__dict__["BINDINGS"]:
            assert isinstance(binding, Binding)
            assert binding.id, f"{owner.__name__}: {binding.key} has no id"
            ids.append(binding.id)
            keys = set(binding.key.split(","))
            assert not keys & FORBIDDEN_KEYS, f"{owner.__name__}: {binding.key}"
    assert len(ids) == len(set(ids)), "binding ids are unique, so a keymap names one binding"


def test_keys_toml_moves_bindings_and_refuses_terminal_keys(tmp_path: Path) -> None:
    from guestsafe.tui.model.keymap import load_keymap

    path = tmp_path / "keys.toml"
    assert load_keymap(path) == ({}, [])
    path.write_text('[keys]\n"jobs.start" = "f9"\n"app.quit" = "ctrl+s"\n"x" = 3\n')
    keymap, problems = load_keymap(path)
    assert keymap == {"jobs.start": "f9"}
    assert len(problems) == 2
    assert "ctrl+s is not usable" in problems[0] or "ctrl+s is not usable" in problems[1]
