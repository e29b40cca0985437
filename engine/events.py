"""What the engine reports while it works.

The engine never prints. It hands small event dataclasses to a ``Reporter``,
a plain callable. The CLI prints them, the TUI posts them to its UI thread,
and the runner also writes them to the run's log file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass


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
class GuestOutcome:
    """The one-line summary of a guest's backup."""

    guest: str
    ok: bool
    version: int | None
    downtime: float | None
    bytes_copied: int
    duration: float
    message: str


Event = LogLine | PhaseChanged | Progress | GuestOutcome
Reporter = Callable[[Event], None]


def null_reporter(event: Event) -> None:
    """A reporter that drops everything."""


def info(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.INFO, message, guest))


def warn(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.WARNING, message, guest))


def error(reporter: Reporter, message: str, guest: str | None = None) -> None:
    reporter(LogLine(logging.ERROR, message, guest))
