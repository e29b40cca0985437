"""What the job form's fields say, as a ``Job`` plus the problems with it.

The form only collects text; this module turns it into a ``Job`` and asks the
engine's own checks (``validate_job``, ``check_job_runtime``) what is wrong,
adding only what text fields need on top: numbers that are not numbers, a
required field left empty, and guests the hypervisor does not know.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.api import (
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_KEEP,
    DEFAULT_LOCK_WAIT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HOOK_PHASES,
    BlockDevice,
    FieldError,
    Hooks,
    Job,
    Mode,
    OnTimeout,
    Schedule,
    as_choice,
    check_job_runtime,
    check_programs,
    validate_job,
)


def hook_field(phase: str) -> str:
    """The form field of a hook phase: ``pre-stop`` is ``hook_pre_stop``."""
    return "hook_" + phase.replace("-", "_")


HOOK_FIELDS = tuple(hook_field(phase) for phase in HOOK_PHASES)

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
    "lock_wait",
    *HOOK_FIELDS,
    "hook_timeout",
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
    lock_wait: str = str(DEFAULT_LOCK_WAIT)
    # Each hook as the operator types it: a program and its arguments, shell-quoted.
    hook_job_start: str = ""
    hook_pre_stop: str = ""
    hook_post_stop: str = ""
    hook_pre_start: str = ""
    hook_post_start: str = ""
    hook_backup_end: str = ""
    hook_backup_abort: str = ""
    hook_job_end: str = ""
    hook_timeout: str = str(DEFAULT_HOOK_TIMEOUT)

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
            lock_wait=str(job.lock_wait),
            hook_timeout=str(job.hooks.timeout),
            **{hook_field(p): shlex.join(argv) for p, argv in job.hooks.commands.items()},
        )


def split_guests(text: str) -> list[str]:
    # Guest names may hold spaces, so only commas separate them.
    return [part.strip() for part in text.split(",") if part.strip()]


def split_weekdays(text: str) -> list[str]:
    return [day.lower() for day in _SPLIT.split(text.strip()) if day]


def _whole_number(
    field: str, text: str, problems: list[FieldError], job_name: str, *, minimum: int = 1
) -> int:
    try:
        return int(text.strip())
    except ValueError:
        problems.append(FieldError(job_name, field, f"{field} must be a whole number"))
        # A stand-in that passes the engine's check, so the field reports once.
        return minimum


def _hooks(values: JobFormValues, problems: list[FieldError], job_name: str) -> Hooks:
    commands: dict[str, list[str]] = {}
    for phase in HOOK_PHASES:
        text = getattr(values, hook_field(phase)).strip()
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            # Quoting only groups arguments here; no shell ever runs the hook.
            problems.append(FieldError(job_name, f"hooks.{phase}", f"hooks.{phase}: {exc}"))
            continue
        if argv:
            commands[phase] = argv
    timeout = _whole_number("hook_timeout", values.hook_timeout, problems, job_name)
    return Hooks(commands, timeout)


def build_job(
    values: JobFormValues, *, hooks: Hooks | None = None, base: Job | None = None
) -> tuple[Job, list[FieldError]]:
    """The job the form describes, and the problems only text can have.

    ``hooks`` replaces the hooks the form's fields give; ``base`` is the job being
    edited, whose settings the form has no field for are kept.
    """
    name = values.name.strip()
    problems: list[FieldError] = []
    destination = values.destination.strip()
    if not destination:
        problems.append(FieldError(name, "destination", "destination is required"))
    # The form has no calendar fields yet; the edited job's rules are kept, and
    # beside them keep may be 0 (FORMAT.md, section 11).
    calendar = _calendar_rules(base)
    least = 0 if any(calendar.values()) else 1
    keep = _whole_number("keep", values.keep, problems, name, minimum=least)
    timeout = _whole_number("shutdown_timeout", values.shutdown_timeout, problems, name)
    lock_wait = _whole_number("lock_wait", values.lock_wait, problems, name, minimum=0)
    typed_hooks = _hooks(values, problems, name)
    schedule = Schedule(values.time.strip() or None, split_weekdays(values.weekdays))
    if base is not None:
        schedule.randomized_delay = base.schedule.randomized_delay
    job = Job(
        name=name,
        guests=split_guests(values.guests),
        destination=Path(destination or "/"),
        device=values.device.strip() or None,
        keep=keep,
        **calendar,
        schedule=schedule,
        mode=as_choice(Mode, values.mode),
        shutdown_timeout=timeout,
        on_timeout=as_choice(OnTimeout, values.on_timeout),
        group=values.group,
        verify=values.verify,
        fallback_to_stop=values.fallback_to_stop,
        include_readonly=base.include_readonly if base is not None else False,  # not in the form
        hooks=hooks if hooks is not None else typed_hooks,
        lock_wait=lock_wait,
    )
    return job, problems


def _calendar_rules(base: Job | None) -> dict[str, int]:
    keys = ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
    return {key: getattr(base, key) for key in keys} if base is not None else {}


def check_job(
    values: JobFormValues,
    *,
    existing: Sequence[Job],
    known_guests: Collection[str] | None,
    hooks: Hooks | None = None,
    base: Job | None = None,
) -> tuple[Job, list[FieldError]]:
    """The job and every problem with it, at most one per field.

    ``existing`` are the other jobs (not the one being edited). ``known_guests``
    are the hypervisor's guests, or None when they could not be listed.
    """
    job, problems = build_job(values, hooks=hooks, base=base)
    seen = {problem.field for problem in problems}

    def add(found: Sequence[FieldError]) -> None:
        for problem in found:
            if problem.field not in seen:
                seen.add(problem.field)
                problems.append(problem)

    add(validate_job(job, existing=existing))
    add(check_job_runtime(job))
    # A hook the runner would refuse (missing, or writable by others) is shown now.
    add([FieldError(job.name, f"hooks.{p}", m) for p, m in check_programs(job.hooks)])
    if known_guests is not None:
        unknown = [guest for guest in job.guests if guest not in known_guests]
        if unknown:
            defined = ", ".join(sorted(known_guests)) or "none"
            message = f"guests: {unknown[0]!r} is not defined on this host (defined: {defined})"
            add([FieldError(job.name, "guests", message)])
    return job, problems


def form_field(field: str) -> str:
    """The form field a FieldError's ``field`` belongs to (``hooks.pre-stop``: its hook)."""
    if field in FIELDS:
        return field
    if field == "hooks.timeout":
        return "hook_timeout"
    if field.startswith("hooks.") and hook_field(field[6:]) in FIELDS:
        return hook_field(field[6:])
    return "name"  # a problem no field shows, such as an unknown hook phase


def by_field(problems: Sequence[FieldError]) -> dict[str, str]:
    """One message per form field."""
    found: dict[str, str] = {}
    for problem in problems:
        found.setdefault(form_field(problem.field), problem.message)
    return found


# --- the device field's hints ----------------------------------------------------


def device_hint(value: str, detected: Sequence[BlockDevice]) -> str:
    """What the device field says under it: the detected devices, or the UUID tip."""
    if value.startswith("/dev/"):
        return "tip: " + node_note(value, detected)
    if not detected:
        return "no external device detected; plug one in, or type /dev/..., UUID=..., LABEL=..."
    shown = [f"{d.spec} ({d.label or 'no label'}, {d.node}, {d.filesystem})" for d in detected]
    return "detected: " + "; ".join(shown)


def node_note(node: str, detected: Sequence[BlockDevice]) -> str:
    """Why the UUID form is better than the node the operator typed."""
    match = next((d for d in detected if d.node == node), None)
    if match is not None and match.uuid:
        return f"{match.spec} names this disk even after re-plugging; {node} may not"
    return f"UUID=... names a disk even after re-plugging; {node} may be another disk next time"
