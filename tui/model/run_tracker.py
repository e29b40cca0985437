"""What a run's log says so far: display lines, the phase, and copy progress.

One tracker reads either source the console has: lines of a log file (a run
started here, by the timer or from a shell) or engine events (a restore, which
writes no log file). Both come down to the same engine events: the log's
structured lines are parsed back into them by the engine (``parse_line``), and
prose lines are only shown, never read, so rewording a message changes nothing
here. Rates come from the lines' own timestamps, so a past log shows the
throughput it had, and the view is the same every time it is drawn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime

from guestsafe.engine.api import escape, parse_line, record_of
from guestsafe.engine.events import (
    Event,
    GuestDowntime,
    GuestOutcome,
    PhaseChanged,
    Progress,
    RunEnded,
    RunKind,
)

RATE_WINDOW = 10.0
# The progress header's words for a run's end: the console's own, not the log's.
FINISHED = {
    (RunKind.BACKUP, True): "finished backup",
    (RunKind.BACKUP, False): "backup failed",
    (RunKind.RESTORE, True): "restore successful",
    (RunKind.RESTORE, False): "restore failed",
}


@dataclass(frozen=True)
class DisplayLine:
    time: str  # "HH:MM:SS", or "" for a line that is not in the log format
    level: str  # INFO, WARNING, ERROR, PHASE, RESULT, FAILED, END, or ""
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
    finished: str | None = None  # how the run ended, once it has
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
        event = parsed.event
        # Progress needs the line's time for its rate; without one it is just text.
        if event is not None and (when is not None or not isinstance(event, Progress)):
            self._take(event, when or 0.0)
            if parsed.quiet:
                return None
        return DisplayLine(clock, parsed.level, parsed.guest, parsed.text)

    def feed_event(self, event: Event, when: float) -> DisplayLine | None:
        """Take one engine event received at ``when`` (epoch seconds)."""
        self._take(event, when)
        record = record_of(event)
        if record is None or record.quiet:
            return None
        clock = datetime.fromtimestamp(when).strftime("%H:%M:%S")
        guest = escape(record.guest) if record.guest else None
        return DisplayLine(clock, record.level, guest, escape(record.text))

    # --- state -------------------------------------------------------------

    def _take(self, event: Event, when: float) -> None:
        if isinstance(event, Progress):
            self._progress(event.guest, event.item, event.done, event.total, when)
        elif isinstance(event, PhaseChanged):
            self._set_phase(event.guest, event.phase)
        elif isinstance(event, GuestDowntime):
            self._note_downtime(event.seconds)
        elif isinstance(event, GuestOutcome):
            self._ok = self._ok and event.ok
            self._note_downtime(event.downtime)
        elif isinstance(event, RunEnded):
            self._finished = FINISHED[(event.kind, event.ok)]
            self._ok = self._ok and event.ok
            self._phase = "done" if event.ok else "failed"

    def _set_phase(self, guest: str | None, phase: str) -> None:
        if guest != self._guest:
            self._downtime = None  # the next guest's is not known yet
        self._guest = guest
        self._phase = phase

    def _note_downtime(self, seconds: float | None) -> None:
        if seconds is not None:  # None: no measurement, the last one stays
            self._downtime = f"{seconds:.1f} s"

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
