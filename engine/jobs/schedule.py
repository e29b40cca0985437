"""When jobs run: next-run times, and ``run-due`` for cron (timers are ``timers.py``).

Times follow systemd's own reading of ``OnCalendar=`` so that what guestsafe
shows is what the host's timer does: a job's HH:MM is local wall-clock time in
the host's zone (``TZ``, else ``/etc/localtime``). On the spring-forward day a
time that does not exist (02:30 in Europe/Zurich on the last Sunday of March)
is skipped, and on the fall-back day a time that happens twice runs once, at its
first occurrence. ``tests/unit/test_schedule.py`` holds this against
``systemd-analyze calendar``.

``run_due`` is the cron route: each job's state file in ``<state>/schedule``
says since when its schedule has been served (the start of its last run). A job
is due when one of its scheduled times falls after that and not after now; several
missed times make one run. A job seen for the first time, or whose schedule was
edited, only gets a fresh starting point: creating a 02:00 job at noon, or
adding a weekday, must not stop guests in the middle of the day. systemd's
``Persistent=true`` catches up the same way after the host was off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from guestsafe.engine import locks
from guestsafe.engine.errors import LockBusy
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.jobs.model import WEEKDAYS, Job, Schedule
from guestsafe.engine.paths import ensure_dir

STATE_DIR = "schedule"
# Far enough back to find a time of any schedule: a weekly time whose day is
# skipped for DST still comes two weeks back.
_LOOKBACK_DAYS = 15
_SYSTEMD_DAYS = {day: day.capitalize() for day in WEEKDAYS}


# --- time zone and next run --------------------------------------------------


def local_zone() -> tzinfo:
    """The host's zone as systemd sees it: ``TZ`` if set, else ``/etc/localtime``.

    A fixed offset from ``datetime.now().astimezone()`` would be wrong across a
    DST change, so this returns a real zone with its rules.
    """
    tz = os.environ.get("TZ")
    if tz is not None:
        return _zone_from_tz(tz)
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def _zone_from_tz(tz: str) -> tzinfo:
    name = tz.removeprefix(":")
    if not name:
        return UTC  # glibc reads an empty TZ as UTC
    try:
        if name.startswith("/"):
            with open(name, "rb") as f:
                return ZoneInfo.from_file(f, key=name)
        return ZoneInfo(name)
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return UTC  # glibc, too, falls back to UTC for a TZ it cannot read


def _schedule(item: Job | Schedule) -> Schedule:
    return item.schedule if isinstance(item, Job) else item


def _run_at(schedule: Schedule, day: date, zone: tzinfo) -> datetime | None:
    """The job's time on ``day``, or None if it does not run or the time does not exist."""
    assert schedule.time is not None
    if schedule.weekdays and WEEKDAYS[day.weekday()] not in schedule.weekdays:
        return None
    hour, minute = (int(part) for part in schedule.time.split(":"))
    wall = datetime.combine(day, time(hour, minute), tzinfo=zone)  # fold=0: first occurrence
    # A wall time in the spring-forward gap does not survive the round trip.
    if wall.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None):
        return None
    return wall


def _runs_from(schedule: Schedule, first: date, zone: tzinfo, step: int) -> Iterator[datetime]:
    for offset in range(_LOOKBACK_DAYS * 2):
        when = _run_at(schedule, first + timedelta(days=offset * step), zone)
        if when is not None:
            yield when


def current_time() -> datetime:
    """Now; the one place schedule code reads the clock, so tests can fix it."""
    return datetime.now(UTC)


def _now(now: datetime | None) -> datetime:
    if now is None:
        return current_time()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def next_run(
    item: Job | Schedule, now: datetime | None = None, zone: tzinfo | None = None
) -> datetime | None:
    """The first scheduled time strictly after ``now``, in ``zone``; None for manual jobs."""
    schedule = _schedule(item)
    if schedule.time is None:
        return None
    zone = zone or local_zone()
    current = _now(now).astimezone(zone)
    for when in _runs_from(schedule, current.date(), zone, +1):
        if when > current:
            return when
    return None


def previous_run(
    item: Job | Schedule, now: datetime | None = None, zone: tzinfo | None = None
) -> datetime | None:
    """The last scheduled time at or before ``now``; None for manual jobs."""
    schedule = _schedule(item)
    if schedule.time is None:
        return None
    zone = zone or local_zone()
    current = _now(now).astimezone(zone)
    for when in _runs_from(schedule, current.date(), zone, -1):
        if when <= current:
            return when
    return None


def on_calendar(item: Job | Schedule) -> str | None:
    """The ``OnCalendar=`` value for a schedule: ``Mon,Fri *-*-* 02:30:00``."""
    schedule = _schedule(item)
    if schedule.time is None:
        return None
    days = ",".join(_SYSTEMD_DAYS[d] for d in WEEKDAYS if d in schedule.weekdays)
    spec = f"*-*-* {schedule.time}:00"
    return f"{days} {spec}" if days else spec


# --- run-due -------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleState:
    since: datetime  # start of the last run, or when the schedule was first seen
    calendar: str


def _state_path(state_dir: Path, job_name: str) -> Path:
    return state_dir / STATE_DIR / f"{job_name}.json"


def read_state(state_dir: Path, job_name: str) -> ScheduleState | None:
    try:
        record = json.loads(_state_path(state_dir, job_name).read_bytes())
        return ScheduleState(datetime.fromisoformat(record["since"]), str(record["calendar"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: the job starts afresh, it never runs twice


def write_state(state_dir: Path, job: Job, since: datetime) -> None:
    """Note that ``job``'s schedule is served up to ``since`` (a run starting now)."""
    ensure_dir(state_dir / STATE_DIR)
    record = {"since": since.astimezone(UTC).isoformat(), "calendar": on_calendar(job) or ""}
    atomic_write_bytes(_state_path(state_dir, job.name), json.dumps(record).encode())


def due_time(job: Job, state: ScheduleState | None, now: datetime) -> datetime | None:
    """The scheduled time that makes ``job`` due now, or None if it is not due."""
    if state is None or state.calendar != (on_calendar(job) or ""):
        return None
    last = previous_run(job, now)
    if last is None or last <= state.since:
        return None
    return last


@dataclass(frozen=True)
class DueRun:
    job: str
    due: datetime
    ok: bool
    # The backups went well, but these restore tests after them did not pass.
    restore_tests_failed: tuple[str, ...] = ()


def run_due(
    jobs: list[Job],
    state_dir: Path,
    run: Callable[[Job], bool],
    *,
    clock: Callable[[], datetime] | None = None,
) -> list[DueRun]:
    """Run each scheduled job that is due, once; ``run`` returns whether it went well.

    Deciding and running happen under a per-job lock taken without waiting: a
    second ``run-due`` (the next minute's cron line) skips a job the first one
    is still deciding on or running, and finds it not due once it is done.
    """
    done: list[DueRun] = []
    for job in jobs:
        if job.schedule.time is None:
            continue
        try:
            lock = locks.acquire(state_dir, f"run-due:{job.name}", f"run-due of job {job.name}")
        except LockBusy:
            continue
        with lock:
            now = (clock or current_time)()
            state = read_state(state_dir, job.name)
            if state is None or state.calendar != on_calendar(job):
                write_state(state_dir, job, now)
                continue
            due = due_time(job, state, now)
            if due is None:
                continue
            # Noted before the run, so a run that dies half-way is not repeated
            # every minute; the next scheduled time runs it again.
            write_state(state_dir, job, now)
            done.append(DueRun(job.name, due, run(job)))
    return done
