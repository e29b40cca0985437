"""What a run's log says so far: display lines, the phase, and copy progress.

One tracker reads either source the console has: lines of a log file (a run
started here, by the timer or from a shell) or engine events (a restore, which
writes no log file). Rates come from the lines' own timestamps, so a past log
shows the throughput it had, and the view is the same every time it is drawn.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from guestsafe.engine.backup.runlog import escape, parse_line
from guestsafe.engine.events import Event, GuestOutcome, LogLine, PhaseChanged, Progress

# Lines that end an engine call, and whether they mean it went well.
_FINAL = {"finished backup": True, "backup failed": False, "restore successful": True}
RATE_WINDOW = 10.0
# "guest is running again (downtime 2.9 s)" and the guest's result line say it.
_DOWNTIME = re.compile(r"\bdowntime (\d+(?:\.\d+)? s)\b")


@dataclass(frozen=True)
class DisplayLine:
    time: str  # "HH:MM:SS", or "" for a line that is not in the log format
    level: str  # INFO, WARNING, ERROR, PHASE, RESULT, FAILED, or ""
    guest: str | None
    text: str


@dataclass(frozen=True)
class ProgressView:
    guest: str | None = None
    phase: str | None = None
    item: str | None = None
    done: int = 0
    total: int = 0
    rate: float | None = None  # bytes per second
    eta: float | None = None  # seconds
    finished: str | None = None  # the final line, once there is one
    ok: bool = True
    downtime: str | None = None  # "2.9 s": the guest's measured downtime, once known


class RunTracker:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._guest: str | None = None
        self._phase: str | None = None
        self._item: tuple[str, str] | None = None
        self._done = 0
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._finished: str | None = None
        self._ok = True
        self._downtime: str | None = None

    # --- input -------------------------------------------------------------

    def feed_line(self, raw: str) -> DisplayLine | None:
        """Take one log file line; None when it only moves the progress bar."""
        parsed = parse_line(raw)
        if parsed is None:
            return DisplayLine("", "", None, escape(raw)) if raw.strip() else None
        when = _epoch(parsed.time)
        clock = parsed.time[11:19] if len(parsed.time) >= 19 else parsed.time
        if parsed.level == "PROGRESS":
            fields = parsed.text.rsplit(" ", 2)
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit() and when:
                self._progress(parsed.guest or "-", fields[0], int(fields[1]), int(fields[2]), when)
                return None
        self._note_downtime(parsed.text)
        if parsed.level == "PHASE":
            self._set_phase(parsed.guest, parsed.text)
        elif parsed.level == "FAILED":
            self._ok = False
        elif parsed.level in ("INFO", "ERROR"):
            self._check_final(parsed.text)
        return DisplayLine(clock, parsed.level, parsed.guest, parsed.text)

    def feed_event(self, event: Event, when: float) -> DisplayLine | None:
        """Take one engine event received at ``when`` (epoch seconds)."""
        clock = datetime.fromtimestamp(when).strftime("%H:%M:%S")
        if isinstance(event, Progress):
            self._progress(event.guest, event.item, event.done, event.total, when)
            return None
        if isinstance(event, PhaseChanged):
            self._set_phase(event.guest, event.phase)
            return DisplayLine(clock, "PHASE", escape(event.guest), escape(event.phase))
        if isinstance(event, GuestOutcome | LogLine):
            self._note_downtime(event.message)
        if isinstance(event, GuestOutcome):
            self._ok = self._ok and event.ok
            level = "RESULT" if event.ok else "FAILED"
            return DisplayLine(clock, level, escape(event.guest), escape(event.message))
        if isinstance(event, LogLine):
            self._check_final(event.message)
            level = logging.getLevelName(event.level)
            guest = escape(event.guest) if event.guest else None
            return DisplayLine(clock, str(level), guest, escape(event.message))
        return None

    # --- state -------------------------------------------------------------

    def _set_phase(self, guest: str | None, phase: str) -> None:
        if guest != self._guest:
            self._downtime = None  # the next guest's is not known yet
        self._guest = guest
        self._phase = phase

    def _note_downtime(self, text: str) -> None:
        match = _DOWNTIME.search(text)
        if match:
            self._downtime = match.group(1)

    def _check_final(self, text: str) -> None:
        if text in _FINAL:
            self._finished = text
            self._ok = self._ok and _FINAL[text]
            self._phase = "done" if _FINAL[text] else "failed"

    def _progress(self, guest: str, item: str, done: int, total: int, when: float) -> None:
        key = (guest, item)
        if key != self._item or done < self._done:
            self._item = key
            self._samples.clear()
        self._guest = guest
        self._done, self._total = done, total
        self._samples.append((when, done))
        while len(self._samples) > 2 and when - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()

    @property
    def view(self) -> ProgressView:
        rate = eta = None
        if len(self._samples) >= 2:
            (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
            if t1 > t0 and d1 >= d0:
                rate = (d1 - d0) / (t1 - t0)
                if rate > 0 and self._total >= self._done:
                    eta = (self._total - self._done) / rate
        return ProgressView(
            guest=self._guest,
            phase=self._phase,
            item=self._item[1] if self._item else None,
            done=self._done,
            total=self._total,
            rate=rate,
            eta=eta,
            finished=self._finished,
            ok=self._ok,
            downtime=self._downtime,
        )


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None
