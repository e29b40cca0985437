"""Engine values as the short texts the console shows: sizes, times, schedules.

Plain strings only; ``tui/formatting.py`` turns them (and names) into Rich text.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from guestsafe.engine.api import Job, byte_size


def size(n: int | float) -> str:
    return byte_size(n)


def rate(bytes_per_second: float) -> str:
    return f"{size(bytes_per_second)}/s"


def duration(seconds: float) -> str:
    """A short, stable duration: 45s, 3m 05s, 1h 02m."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def schedule(job: Job) -> str:
    """When a job runs: "02:00 daily", "03:30 sun" or "manual"."""
    if job.schedule.time is None:
        return "manual"
    days = ",".join(job.schedule.weekdays) if job.schedule.weekdays else "daily"
    return f"{job.schedule.time} {days}"


_TIMER_NOTE = {"installed": "", "outdated": " old timer", "missing": " no timer"}
_TIMER_DETAIL = {
    "installed": "timer installed",
    "outdated": "timer out of date: guestsafe schedule install",
    "missing": "no timer: guestsafe schedule install",
}


def next_run(when: datetime | None, timer: str | None, now: datetime) -> str:
    """The Jobs table's next run: "Mon 02:00", "no timer" added when none would start it."""
    if when is None:
        return "manual"
    # A weekday names the day unambiguously only within the coming week.
    shown = when.strftime("%a %H:%M" if when - now < timedelta(days=7) else "%m-%d %H:%M")
    return shown + _TIMER_NOTE.get(timer or "", "")


def schedule_detail(job: Job, when: datetime | None, timer: str | None) -> str:
    """One line on when the job runs next and whether a timer will start it."""
    if when is None:
        return "Manual job: it runs when started here or with guestsafe run."
    timer_text = _TIMER_DETAIL.get(timer or "", "")
    return f"Next run {when:%a %Y-%m-%d %H:%M %Z} ({schedule(job)}); {timer_text}"


def where(job: Job) -> str:
    """The destination, or the device and where it is mounted."""
    if job.device:
        return f"{job.device} -> {job.destination}"
    return str(job.destination)


def short_time(iso: str) -> str:
    """An ISO timestamp as local "YYYY-MM-DD HH:MM"; anything else as it is."""
    try:
        stamp = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone()
    return stamp.strftime("%Y-%m-%d %H:%M")


def keep_summary(job: Job) -> str:
    """The Jobs table's KEEP: "7" for a plain count, "l3 d7 w4" for calendar rules."""
    counts = {
        "l": job.keep,
        "d": job.keep_daily,
        "w": job.keep_weekly,
        "m": job.keep_monthly,
        "y": job.keep_yearly,
    }
    if not any(counts[letter] for letter in "dwmy"):
        return str(job.keep)
    return " ".join(f"{letter}{count}" for letter, count in counts.items() if count)
