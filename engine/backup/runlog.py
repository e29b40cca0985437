"""One log file per run, in a format both people and the console can read.

Each line is ``<ISO time> <LEVEL> <guest or -> <text>``. ``INFO``, ``WARNING``
and ``ERROR`` lines are prose for people; nothing reads meaning out of them.
The other levels record facts (engine events) that the console reads back with
``parse_line``, so it can follow a run it did not start (a timer's, say):

- ``PHASE web1 copy``: the guest's phase;
- ``PROGRESS web1 vda 1073741824 8589934592``: bytes done and total, throttled
  so a long copy does not flood the file;
- ``DOWNTIME web1 2.9 s``: the guest runs again after that long down;
- ``RESULT web1 <text> [version=3 downtime=2.9 bytes=268435456 seconds=4.1]``
  (``FAILED`` when the guest's backup failed): one per guest at the end, the text
  saying the same for people (ok or failed, version, downtime, bytes, duration),
  the fields in brackets for the console (``-`` where there is no value);
- ``END - finished backup [run=backup status=ok]``: the run is over.

A structured line whose fields do not parse (a log cut short, an older
guestsafe's log, whose RESULT lines have no fields and whose end is an INFO
line) still reads as a line of text; it just records no fact.
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

from guestsafe.engine.events import (
    Event,
    GuestDowntime,
    GuestOutcome,
    LogLine,
    PhaseChanged,
    Progress,
    Reporter,
    RunEnded,
    RunKind,
)

PROGRESS_INTERVAL = 1.0
_LINE = re.compile(r"^(\S+) (\w+) (\S+) (.*)$")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
NONE = "-"
OK, FAILED = "ok", "failed"
# Levels of the lines that only feed the console's progress view, not its text.
QUIET_LEVELS = frozenset({"PROGRESS", "DOWNTIME"})


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
        if isinstance(event, Progress) and not self._progress_due(event):
            self._forward(event)
            return
        record = record_of(event)
        if record is not None:
            self._write(_line(record))
        self._forward(event)

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


@dataclass(frozen=True)
class Record:
    """What one line says, before its time stamp: how ``RunLog`` writes an event."""

    level: str
    guest: str | None
    text: str  # for people
    fields: tuple[tuple[str, str], ...] = ()  # for the console, after the text

    @property
    def quiet(self) -> bool:
        """A line that moves the progress view but says nothing to read."""
        return self.level in QUIET_LEVELS


def record_of(event: Event) -> Record | None:
    """The line ``event`` is written as (without its time)."""
    if isinstance(event, LogLine):
        return Record(logging.getLevelName(event.level), event.guest, event.message)
    if isinstance(event, PhaseChanged):
        return Record("PHASE", event.guest, event.phase)
    if isinstance(event, Progress):
        return Record("PROGRESS", event.guest, f"{event.item} {event.done} {event.total}")
    if isinstance(event, GuestDowntime):
        return Record("DOWNTIME", event.guest, f"{_decimal(event.seconds)} s")
    if isinstance(event, GuestOutcome):
        fields: tuple[tuple[str, str], ...] = (
            ("version", NONE if event.version is None else str(event.version)),
            ("downtime", NONE if event.downtime is None else _decimal(event.downtime)),
            ("bytes", str(event.bytes_copied)),
            ("seconds", _decimal(event.duration)),
        )
        return Record("RESULT" if event.ok else "FAILED", event.guest, event.message, fields)
    if isinstance(event, RunEnded):
        ended = (("run", str(event.kind)), ("status", OK if event.ok else FAILED))
        return Record("END", event.guest, event.message, ended)
    return None


def _decimal(seconds: float) -> str:
    # One decimal, as the text beside it says it: the console shows it so.
    return f"{seconds:.1f}"


def _line(record: Record) -> str:
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    who = escape(record.guest).replace(" ", "\\x20") if record.guest else NONE
    text = escape(record.text)
    if record.fields:
        text += " [" + " ".join(f"{key}={value}" for key, value in record.fields) + "]"
    return f"{stamp} {record.level} {who} {text}"


@dataclass(frozen=True)
class ParsedLine:
    time: str
    level: str
    guest: str | None  # as written: escaped, a space as \x20
    text: str  # for people, without the fields
    event: Event | None  # the fact a structured line records; None for prose

    @property
    def quiet(self) -> bool:
        return self.event is not None and self.level in QUIET_LEVELS


def parse_line(line: str) -> ParsedLine | None:
    """A line of a run's log; None for one not in the format at all."""
    match = _LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    stamp, level, who, text = match.groups()
    guest = None if who == NONE else who
    split = _split_fields(text) if level in ("RESULT", "FAILED", "END") else None
    if split is not None:
        event = _fact(level, guest, *split)
        if event is not None:  # fields that do not parse stay part of the text
            return ParsedLine(stamp, level, guest, split[0], event)
        return ParsedLine(stamp, level, guest, text, None)
    return ParsedLine(stamp, level, guest, text, _fact(level, guest, text, {}))


def _split_fields(text: str) -> tuple[str, dict[str, str]] | None:
    head, sep, block = text.rpartition(" [")
    if not sep or not block.endswith("]"):
        return None
    fields: dict[str, str] = {}
    for token in block[:-1].split(" "):
        key, eq, value = token.partition("=")
        if not eq or not key or key in fields:
            return None
        fields[key] = value
    return head, fields


def _fact(level: str, guest: str | None, text: str, fields: dict[str, str]) -> Event | None:
    try:
        if level == "PHASE" and guest is not None:
            return PhaseChanged(guest, text)
        if level == "PROGRESS":
            return _progress(guest, text)
        if level == "DOWNTIME" and guest is not None and text.endswith(" s"):
            return GuestDowntime(guest, _seconds(text.removesuffix(" s")))
        if level in ("RESULT", "FAILED") and guest is not None and fields:
            return _outcome(level == "RESULT", guest, text, fields)
        if level == "END" and fields.keys() == {"run", "status"}:
            status = fields["status"]
            if status in (OK, FAILED):
                return RunEnded(RunKind(fields["run"]), status == OK, text, guest)
    except ValueError:
        pass  # fields that do not parse: a line of text, no fact
    return None


def _progress(guest: str | None, text: str) -> Progress | None:
    fields = text.rsplit(" ", 2)
    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
        return Progress(guest or NONE, fields[0], int(fields[1]), int(fields[2]))
    return None


def _outcome(ok: bool, guest: str, text: str, fields: dict[str, str]) -> GuestOutcome | None:
    if fields.keys() != {"version", "downtime", "bytes", "seconds"}:
        return None
    version = None if fields["version"] == NONE else _count(fields["version"])
    downtime = None if fields["downtime"] == NONE else _seconds(fields["downtime"])
    copied, duration = _count(fields["bytes"]), _seconds(fields["seconds"])
    return GuestOutcome(guest, ok, version, downtime, copied, duration, text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _seconds(text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(text)
    return float(text)
