"""The run log's protocol: facts written as lines and read back, prose only shown.

The console follows a run through its log file. It must learn the run's end,
each guest's result and the downtime from structured lines only, so that
rewording what the engine says to people changes nothing it shows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from guestsafe.engine.backup.runlog import RunLog, parse_line
from guestsafe.engine.events import (
    Event,
    GuestDowntime,
    GuestOutcome,
    LogLine,
    PhaseChanged,
    Progress,
    RunEnded,
    RunKind,
    backup_ended,
)
from guestsafe.tui.model.run_tracker import ProgressView, RunTracker

FACTS: list[Event] = [
    PhaseChanged("web 1", "copy"),
    Progress("web 1", "vda", 5, 10),
    GuestDowntime("web 1", 2.9),
    GuestOutcome("web 1", True, 3, 2.9, 268435456, 4.1, "ok: version 3 [x] y"),
    GuestOutcome("db1", False, None, None, 0, 0.5, "failed: no room [version=9]"),
    RunEnded(RunKind.BACKUP, False, "backup failed"),
    RunEnded(RunKind.RESTORE, True, "restore successful", "clone"),
]


def written(tmp_path: Path, events: Sequence[Event], name: str = "run.log") -> list[str]:
    log = RunLog(tmp_path / name, lambda event: None)
    for event in events:
        log(event)
    log.close()
    return (tmp_path / name).read_text(encoding="utf-8").splitlines()


def test_every_fact_reads_back_as_the_event_written(tmp_path: Path) -> None:
    lines = written(tmp_path, FACTS)
    read = [parse_line(line) for line in lines]
    events = [parsed.event for parsed in read if parsed is not None]
    # A guest's spaces are written as \x20, so its field stays one word.
    assert events[0] == PhaseChanged("web\\x20" + "1", "copy")
    assert [e for e in events[1:] if not isinstance(e, Progress)] == [
        GuestDowntime("web\\x201", 2.9),
        GuestOutcome("web\\x201", True, 3, 2.9, 268435456, 4.1, "ok: version 3 [x] y"),
        GuestOutcome("db1", False, None, None, 0, 0.5, "failed: no room [version=9]"),
        RunEnded(RunKind.BACKUP, False, "backup failed"),
        RunEnded(RunKind.RESTORE, True, "restore successful", "clone"),
    ]


def test_a_result_line_says_it_all_to_people_too(tmp_path: Path) -> None:
    outcome = GuestOutcome("web1", True, 3, 2.94, 268435456, 4.06, "ok: version 3, ...")
    [line] = written(tmp_path, [outcome])
    assert line.split(" ", 1)[1] == (
        "RESULT web1 ok: version 3, ... [version=3 downtime=2.9 bytes=268435456 seconds=4.1]"
    )
    [end] = written(tmp_path, [backup_ended(True)], "end.log")
    assert end.split(" ", 1)[1] == "END - finished backup [run=backup status=ok]"


def test_prose_about_downtime_records_no_fact(tmp_path: Path) -> None:
    # The downtime reaches the log as a GuestDowntime event; sentences are for people.
    lines = written(
        tmp_path,
        [
            LogLine(logging.INFO, "guest is running again (downtime 2.9 s)", "web1"),
            LogLine(logging.INFO, "hook post-start: guest is running again (downtime 9 s)", "db1"),
        ],
    )
    facts = [p.event for p in map(parse_line, lines) if p is not None and p.event is not None]
    assert facts == [] and len(lines) == 2


@pytest.mark.parametrize(
    "line",
    [
        # An older guestsafe's log: no fields on its results, its end an INFO line.
        "2025-01-06T02:00:09+00:00 RESULT web1 ok: version 3, downtime 2.9 s, 1 GiB in 9.0 s",
        "2025-01-06T02:00:09+00:00 INFO - finished backup",
        "2025-01-06T02:00:03+00:00 INFO web1 guest is running again (downtime 2.9 s)",
        # Fields that do not parse, or that a prose line only looks like.
        "2025-01-06T02:00:09+00:00 RESULT web1 ok [version=x downtime=- bytes=0 seconds=1.0]",
        "2025-01-06T02:00:09+00:00 RESULT web1 ok [version=1 bytes=0 seconds=1.0]",
        "2025-01-06T02:00:09+00:00 END - done [run=nap status=ok]",
        "2025-01-06T02:00:09+00:00 END - done [run=backup status=maybe]",
        "2025-01-06T02:00:09+00:00 INFO - hook job-end: x [run=backup status=ok]",
        "2025-01-06T02:00:09+00:00 DOWNTIME web1 nan s",
    ],
)
def test_lines_without_good_fields_are_text_that_records_nothing(line: str) -> None:
    parsed = parse_line(line)
    assert parsed is not None and parsed.event is None
    assert line.endswith(parsed.text)
    tracker = RunTracker()
    shown = tracker.feed_line(line)
    assert shown is not None and shown.text == parsed.text
    assert tracker.view == ProgressView()


# --- rewording ---------------------------------------------------------------------


def a_run(words: dict[str, str]) -> list[Event]:
    """One run of two guests, its prose in ``words``' wording."""
    return [
        LogLine(logging.INFO, words["begin"]),
        PhaseChanged("web1", "shutdown"),
        LogLine(logging.INFO, words["off"], "web1"),
        PhaseChanged("web1", "copy"),
        Progress("web1", "vda", 1 << 30, 4 << 30),
        PhaseChanged("web1", "start"),
        GuestDowntime("web1", 2.94),
        PhaseChanged("db1", "copy"),
        Progress("db1", "vdb", 2 << 30, 4 << 30),
        GuestOutcome("web1", True, 3, 2.94, 1 << 30, 9.0, words["ok"]),
        GuestOutcome("db1", False, None, 1.04, 0, 3.0, words["failed"]),
        RunEnded(RunKind.BACKUP, False, words["end"]),
    ]


PLAIN = {
    "begin": "job nightly: web1, db1 -> /srv/backup",
    "off": "guest is off after 3.9 s",
    "ok": "ok: version 3, downtime 2.9 s, 1.0 GiB in 9.0 s",
    "failed": "failed: no room; downtime 1.0 s, 0 Bytes in 3.0 s",
    "end": "backup failed",
}
REWORDED = {
    "begin": "starting job nightly",
    "off": "web1 is down (took 12 s, downtime 99 s)",
    "ok": "saved as number 3 after 2 s offline",
    "failed": "could not save: downtime 7.7 s, finished backup",
    "end": "finished backup",  # even the words of the other outcome
}


def view_of_log(tmp_path: Path, words: dict[str, str], name: str) -> tuple[ProgressView, int]:
    tracker = RunTracker()
    shown = [tracker.feed_line(line) for line in written(tmp_path, a_run(words), name)]
    return tracker.view, sum(line is not None for line in shown)


def test_rewording_the_engines_messages_changes_nothing_the_console_shows(
    tmp_path: Path,
) -> None:
    plain, plain_lines = view_of_log(tmp_path, PLAIN, "plain.log")
    reworded, reworded_lines = view_of_log(tmp_path, REWORDED, "reworded.log")

    assert reworded == plain
    assert (plain.finished, plain.ok, plain.phase) == ("backup failed", False, "failed")
    assert (plain.guest, plain.item, plain.done) == ("db1", "vdb", 2 << 30)
    assert plain.downtime == "1.0 s"  # the last guest's result says it
    assert reworded_lines == plain_lines


def test_rewording_changes_nothing_when_events_are_fed_directly() -> None:
    views = []
    for words in (PLAIN, REWORDED):
        tracker = RunTracker()
        for when, event in enumerate(a_run(words)):
            tracker.feed_event(event, float(when))
        views.append(tracker.view)
    assert views[0] == views[1]
    assert views[0].finished == "backup failed" and views[0].downtime == "1.0 s"


def test_the_downtime_line_shows_before_the_guests_result(tmp_path: Path) -> None:
    tracker = RunTracker()
    lines = written(tmp_path, a_run(REWORDED)[:7])
    for line in lines:
        tracker.feed_line(line)
    assert (tracker.view.guest, tracker.view.downtime) == ("web1", "2.9 s")
