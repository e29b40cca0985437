"""What the engine reports while it works.

The engine never prints. It hands small event dataclasses to a ``Reporter``,
a plain callable. The CLI prints them, the TUI posts them to its UI thread,
and the runner also writes them to the run's log file (``backup/runlog.py``),
from which the console reads them back. ``LogLine`` is prose for people; the
other events are the facts front-ends act on, so rewording a message changes
no front-end's view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class LogLine:
    level: int
    message: str
    guest: str | None = None


@dataclass(frozen=True)
class PhaseChanged:
    guest: str
    phase: str


@dataclass(frozen=True)
class Progress:
    guest: str
    item: str
    done: int
    total: int


@dataclass(frozen=True)
class GuestDowntime:
    """The guest runs again after ``seconds`` down (its outcome says it once more)."""

    guest: str
    seconds: float


@dataclass(frozen=True)
class GuestOutcome:
    """The one-line summary of a guest's backup."""

    guest: str
    ok: bool
    version: int | None
    downtime: float | None
    bytes_copied: int
    duration: float
    message: str


class RunKind(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"


@dataclass(frozen=True)
class RunEnded:
    """The last event of a backup job or of a restore, and whether it went well."""

    kind: RunKind
    ok: bool
    message: str  # for people: "finished backup"; front-ends show their own words
    guest: str | None = None


Event = LogLine | PhaseChanged | Progress | GuestDowntime | GuestOutcome | RunEnded
Reporter = Callable[[Event], None]


def null_reporter(event: Event) -> None:
    """A reporter that drops everything."""


def info(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.INFO, message, guest))


def warn(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.WARNING, message, guest))


def error(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.ERROR, message, guest))


def backup_ended(ok: bool) -> RunEnded:
    """The last event of a backup job."""
    return RunEnded(RunKind.BACKUP, ok, "finished backup" if ok else "backup failed")
