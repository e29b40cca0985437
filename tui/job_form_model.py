"""What the job form's fields say, as a ``Job`` plus the problems with it.

The form only collects text; this module turns it into a ``Job`` and asks the
engine's own checks (``validate_job``, ``check_job_runtime``) what is wrong,
adding only what text fields need on top: numbers that are not numbers, a
required field left empty, and guests the hypervisor does not know.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..engine.jobs import (
    DEFAULT_KEEP,
    DEFAULT_SHUTDOWN_TIMEOUT,
    FieldError,
    Hooks,
    Job,
    Schedule,
    check_job_runtime,
    validate_job,
)

# The form's fields, top to bottom; a FieldError's ``field`` is one of these.
FIELDS = (
    "name",
    "guests",
    "destination",
    "device",
    "keep",
    "time",
    "weekdays",
    "mode",
    "fallback_to_stop",
    "shutdown_timeout",
    "on_timeout",
    "group",
    "verify",
)

MODE_HELP = {
    "stop": "shut down, copy, start: consistent, downtime = copy time",
    "stop-short": (
        "shut down, start paused, QEMU copies while the guest runs: consistent, "
        "downtime = shutdown + boot"
    ),
    "snapshot": "live copy of a running guest: CRASH-CONSISTENT, may hold a torn database",
}

_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class JobFormValues:
    """The form's fields as typed."""

    name: str = ""
    guests: str = ""
    destination: str = ""
    device: str = ""
    keep: str = str(DEFAULT_KEEP)
    time: str = ""
    weekdays: str = ""
    mode: str = "stop"
    shutdown_timeout: str = str(DEFAULT_SHUTDOWN_TIMEOUT)
    on_timeout: str = "abort"
    group: bool = False
    verify: bool = True
    fallback_to_stop: bool = False

    @classmethod
    def from_job(cls, job: Job) -> JobFormValues:
        return cls(
            name=job.name,
            guests=", ".join(job.guests),
            destination=str(job.destination),
            device=job.device or "",
            keep=str(job.keep),
            time=job.schedule.time or "",
            weekdays=", ".join(job.schedule.weekdays),
            mode=job.mode,
            shutdown_timeout=str(job.shutdown_timeout),
            on_timeout=job.on_timeout,
            group=job.group,
            verify=job.verify,
            fallback_to_stop=job.fallback_to_stop,
        )


def split_guests(text: str) -> list[str]:
    # Guest names may hold spaces, so only commas separate them.
    return [part.strip() for part in text.split(",") if part.strip()]


def split_weekdays(text: str) -> list[str]:
    return [day.lower() for day in _SPLIT.split(text.strip()) if day]


def _whole_number(field: str, text: str, problems: list[FieldError], job_name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        problems.append(FieldError(job_name, field, f"{field} must be a whole number"))
        # A stand-in that passes the engine's check, so the field reports once.
        return 1


def build_job(values: JobFormValues, *, hooks: Hooks | None = None) -> tuple[Job, list[FieldError]]:
    """The job the form describes, and the problems only text can have."""
    name = values.name.strip()
    problems: list[FieldError] = []
    destination = values.destination.strip()
    if not destination:
        problems.append(FieldError(name, "destination", "destination is required"))
    keep = _whole_number("keep", values.keep, problems, name)
    timeout = _whole_number("shutdown_timeout", values.shutdown_timeout, problems, name)
    job = Job(
        name=name,
        guests=split_guests(values.guests),
        destination=Path(destination or "/"),
        device=values.device.strip() or None,
        keep=keep,
        schedule=Schedule(values.time.strip() or None, split_weekdays(values.weekdays)),
        mode=values.mode,
        shutdown_timeout=timeout,
        on_timeout=values.on_timeout,
        group=values.group,
        verify=values.verify,
        fallback_to_stop=values.fallback_to_stop,
        hooks=hooks if hooks is not None else Hooks(),
    )
    return job, problems


def check_job(
    values: JobFormValues,
    *,
    existing: Sequence[Job],
    known_guests: Collection[str] | None,
    hooks: Hooks | None = None,
) -> tuple[Job, list[FieldError]]:
    """The job and every problem with it, at most one per field.

    ``existing`` are the other jobs (not the one being edited). ``known_guests``
    are the hypervisor's guests, or None when they could not be listed.
    """
    job, problems = build_job(values, hooks=hooks)
    seen = {problem.field for problem in problems}

    def add(found: Sequence[FieldError]) -> None:
        for problem in found:
            if problem.field not in seen:
                seen.add(problem.field)
                problems.append(problem)

    add(validate_job(job, existing=existing))
    add(check_job_runtime(job))
    if known_guests is not None:
        unknown = [guest for guest in job.guests if guest not in known_guests]
        if unknown:
            defined = ", ".join(sorted(known_guests)) or "none"
            message = f"guests: {unknown[0]!r} is not defined on this host (defined: {defined})"
            add([FieldError(job.name, "guests", message)])
    return job, problems


def by_field(problems: Sequence[FieldError]) -> dict[str, str]:
    """One message per form field; hook problems go to ``name`` as the form has no hook fields."""
    found: dict[str, str] = {}
    for problem in problems:
        field = problem.field if problem.field in FIELDS else "name"
        found.setdefault(field, problem.message)
    return found
