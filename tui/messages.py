"""Messages the console's parts send each other, as small dataclasses.

Workers run the engine in threads and post these; Textual delivers them on the
UI thread, so handlers may touch widgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from textual.message import Message

from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.events import Event


@dataclass
class ShowError(Message):
    """Show an error in the one place errors go: the ErrorModal."""

    title: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ShowError:
        if isinstance(exc, GuestsafeError):
            return cls(exc.title, exc.message)
        # Not an error the engine meant to raise: still no traceback on screen,
        # but say what it was so a bug report can name it.
        return cls("Unexpected error", f"{type(exc).__name__}: {exc}")


@dataclass
class RunLogOpened(Message):
    """A run (started here) has created its log file."""

    path: Path


@dataclass
class EngineEvents(Message):
    """Events from an engine call that writes no log file of its own (restore, recovery)."""

    events: list[Event] = field(default_factory=list)


@dataclass
class LogLines(Message):
    """New lines read from a log file by the tail worker."""

    path: Path
    generation: int
    lines: list[str]


@dataclass
class StartJobRequested(Message):
    """The operator asked to run a job now; the app confirms and runs it."""

    job: str


@dataclass
class SwitchTab(Message):
    """Show one of the main tabs (jobs, restore, log, guests)."""

    tab: str


@dataclass
class GuestsChanged(Message):
    """A guest was defined or changed state; lists of guests should reload."""


@dataclass
class JobsChanged(Message):
    """The jobs file changed; job lists and destinations should reload."""


@dataclass
class ActivityStarted(Message):
    """An engine call that reports through events (not a log file) begins."""

    title: str


@dataclass
class RestoreEnded(Message):
    """A restore finished, failed or was cancelled."""


@dataclass
class CancelRunRequested(Message):
    """The operator asked to cancel the run started here; the app confirms."""
