"""Engine events printed for a terminal, as the ``guestsafe`` command shows them."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

from guestsafe.engine.api import byte_size, escape
from guestsafe.engine.events import Event, GuestOutcome, LogLine, PhaseChanged, Progress, RunEnded


class ConsoleReporter:
    """Prints engine events; on a TTY, progress is one line redrawn in place."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stderr  # the one in use now, not at import
        self.tty = self.out.isatty()
        self._progress_shown = False
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, Progress):
                self._progress(event)
                return
            self._clear_progress()
            if isinstance(event, LogLine):
                level = (
                    "" if event.level <= logging.INFO else logging.getLevelName(event.level) + ": "
                )
                self._print(event.guest, level + event.message)
            elif isinstance(event, PhaseChanged):
                self._print(event.guest, f"-- {event.phase}")
            elif isinstance(event, GuestOutcome | RunEnded):
                self._print(event.guest, event.message)
            # GuestDowntime: the line before it said so already.

    def _print(self, guest: str | None, text: str) -> None:
        prefix = f"{escape(guest)}: " if guest else ""
        print(prefix + escape(text), file=self.out, flush=True)

    def _progress(self, event: Progress) -> None:
        if not self.tty or event.total <= 0:
            return
        pct = 100 * event.done / event.total
        done, total = byte_size(event.done), byte_size(event.total)
        self.out.write(
            f"\r{escape(event.guest)}: {event.item} {pct:5.1f}% ({done} of {total})\x1b[K"
        )
        self.out.flush()
        self._progress_shown = True

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self.out.write("\r\x1b[K")
            self._progress_shown = False
