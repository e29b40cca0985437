"""One log file per run, in a format both people and the console can read.

Each line is ``<ISO time> <LEVEL> <guest or -> <text>``. Phase changes and
progress are ordinary lines with the levels ``PHASE`` and ``PROGRESS``, so the
console can tail a run it did not start (a timer's, say) and still draw the
progress bar. Progress is throttled so a long copy does not flood the file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from guestsafe.engine.events import Event, GuestOutcome, LogLine, PhaseChanged, Progress, Reporter

PROGRESS_INTERVAL = 1.0
_LINE = re.compile(r"^(\S+) (\w+) (\S+) (.*)$")


def escape(text: str) -> str:
    """Make any text one printable line: control characters become escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def new_log_path(log_dir: Path, job: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(1000):
        suffix = "" if n == 0 else f"-{n}"
        path = log_dir / f"{stamp}-{job}{suffix}.log"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"too many runs of {job} in one second")


class RunLog:
    """Writes events to the run's log file and passes them on."""

    def __init__(self, path: Path, forward: Reporter) -> None:
        self.path = path
        self._forward = forward
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._last_progress: dict[tuple[str, str], float] = {}

    def __call__(self, event: Event) -> None:
        line = self._format(event)
        if line is not None:
            self._write(line)
        self._forward(event)

    def _format(self, event: Event) -> str | None:
        if isinstance(event, LogLine):
            return _line(logging.getLevelName(event.level), event.guest, event.message)
        if isinstance(event, PhaseChanged):
            return _line("PHASE", event.guest, event.phase)
        if isinstance(event, Progress):
            if not self._progress_due(event):
                return None
            return _line("PROGRESS", event.guest, f"{event.item} {event.done} {event.total}")
        if isinstance(event, GuestOutcome):
            return _line("RESULT" if event.ok else "FAILED", event.guest, event.message)
        return None

    def _progress_due(self, event: Progress) -> bool:
        key = (event.guest, event.item)
        now = time.monotonic()
        if event.done < event.total and now - self._last_progress.get(key, 0.0) < PROGRESS_INTERVAL:
            return False
        self._last_progress[key] = now
        return True

    def _write(self, line: str) -> None:
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _line(level: str, guest: str | None, text: str) -> str:
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    who = escape(guest).replace(" ", "\\x20") if guest else "-"
    return f"{stamp} {level} {who} {escape(text)}"


@dataclass(frozen=True)
class ParsedLine:
    time: str
    level: str
    guest: str | None
    text: str


def parse_line(line: str) -> ParsedLine | None:
    match = _LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    stamp, level, guest, text = match.groups()
    return ParsedLine(stamp, level, None if guest == "-" else guest, text)
