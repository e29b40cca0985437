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
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from guestsafe.engine.api import (
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_KEEP,
    DEFAULT_LOCK_WAIT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HOOK_PHASES,
    LOCAL_HOST,
    BlockDevice,
    FieldError,
    Hooks,
    IoClass,
    Job,
    JobConfigError,
    Mode,
    OnTimeout,
    RestoreTestWhen,
    Schedule,
    as_choice,
    byte_rate,
    check_job_runtime,
    check_programs,
    job_hosts,
    parse_bwlimit,
    resolve_guests,
    validate_job,
)


def hook_field(phase: str) -> str:
    """The form field of a hook phase: ``pre-stop`` is ``hook_pre_stop``."""
    return "hook_" + phase.replace("-", "_")


HOOK_FIELDS = tuple(hook_field(phase) for phase in HOOK_PHASES)
# The calendar retention rules, beside keep (keep_last); 0 turns one off.
CALENDAR_FIELDS = ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")

# The form's fields, top to bottom; a FieldError's ``field`` is one of these.
FIELDS = (
    "name",
    "hosts",
    "all_guests",
    "guests",
    "exclude",
    "destination",
    "device",
    "keep",
    *CALENDAR_FIELDS,
    "time",
    "weekdays",
    "mail_to",
    "mode",
    "fallback_to_stop",
    "ionice",
    "bwlimit",
    "shutdown_timeout",
    "on_timeout",
    "group",
    "verify",
    "restore_test",
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
    hosts: str = ""  # host names of jobs.toml, comma-separated; empty: this machine
    all_guests: bool = False
    guests: str = ""
    exclude: str = ""  # name patterns, comma-separated, used only with all_guests
    destination: str = ""
    device: str = ""
    keep: str = str(DEFAULT_KEEP)
    keep_daily: str = "0"
    keep_weekly: str = "0"
    keep_monthly: str = "0"
    keep_yearly: str = "0"
    time: str = ""
    weekdays: str = ""
    mail_to: str = ""  # empty: the [notify] recipients
    mode: str = "stop"
    ionice: str = IoClass.IDLE.value
    bwlimit: str = ""  # a rate like "100 MiB/s"; empty: no limit
    shutdown_timeout: str = str(DEFAULT_SHUTDOWN_TIMEOUT)
    on_timeout: str = "abort"
    group: bool = False
    verify: bool = True
    restore_test: str = RestoreTestWhen.NEVER.value
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
            hosts=", ".join(job.hosts),
            all_guests=job.all_guests,
            guests=", ".join(job.guests),
            exclude=", ".join(job.exclude),
            mail_to=", ".join(job.mail_to),
            ionice=job.ionice,
            bwlimit=byte_rate(job.bwlimit) if job.bwlimit else "",
            destination=str(job.destination),
            device=job.device or "",
            keep=str(job.keep),
            **{key: str(getattr(job, key)) for key in CALENDAR_FIELDS},
            time=job.schedule.time or "",
            weekdays=", ".join(job.schedule.weekdays),
            mode=job.mode,
            shutdown_timeout=str(job.shutdown_timeout),
            on_timeout=job.on_timeout,
            group=job.group,
            verify=job.verify,
            restore_test=job.restore_test,
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


def split_addresses(text: str) -> list[str]:
    # A plain mail address holds neither a comma nor a space.
    return [address for address in _SPLIT.split(text.strip()) if address]


def _bwlimit(values: JobFormValues, problems: list[FieldError], job_name: str) -> int | None:
    try:
        return parse_bwlimit(values.bwlimit)
    except JobConfigError as exc:
        problems.append(FieldError(job_name, "bwlimit", exc.problems[0].message))
        return None


def job_guests(values: JobFormValues) -> tuple[list[str], list[str]]:
    """The guests and the exclude patterns the job gets.

    Only the field in use counts: with all guests ticked the guest list is
    disabled and ignored, without it the exclude field is; the text in the
    other stays, should the operator change their mind.
    """
    if values.all_guests:
        return [], split_guests(values.exclude)
    return split_guests(values.guests), []


def coverage_hint(values: JobFormValues, known_guests: Sequence[str]) -> str:
    """The line under the guests when all guests is ticked: whom the job covers today."""
    guests, exclude = job_guests(values)
    probe = Job("", guests, Path("/"), all_guests=True, exclude=exclude)
    covered = resolve_guests(probe, known_guests)
    left_out = [name for name in known_guests if name not in covered]
    text = "covers now: " + (", ".join(covered) or "no guest")
    if left_out:
        text += "; excluded: " + ", ".join(left_out)
    everyone = list(known_guests)
    # A pattern that leaves every guest in is likely a typo ("scratch-* test-*").
    idle = [p for p in exclude if resolve_guests(replace(probe, exclude=[p]), everyone) == everyone]
    if idle:
        text += f"; {idle[0]!r} matches no guest"
    return text


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
    # Beside a calendar rule keep may be 0 (FORMAT.md, section 11).
    calendar = {
        key: _whole_number(key, getattr(values, key), problems, name, minimum=0)
        for key in CALENDAR_FIELDS
    }
    least = 0 if any(calendar.values()) else 1
    keep = _whole_number("keep", values.keep, problems, name, minimum=least)
    timeout = _whole_number("shutdown_timeout", values.shutdown_timeout, problems, name)
    lock_wait = _whole_number("lock_wait", values.lock_wait, problems, name, minimum=0)
    typed_hooks = _hooks(values, problems, name)
    schedule = Schedule(values.time.strip() or None, split_weekdays(values.weekdays))
    if base is not None:
        schedule.randomized_delay = base.schedule.randomized_delay
    guests, exclude = job_guests(values)
    job = Job(
        name=name,
        guests=guests,
        destination=Path(destination or "/"),
        device=values.device.strip() or None,
        keep=keep,
        keep_daily=calendar["keep_daily"],
        keep_weekly=calendar["keep_weekly"],
        keep_monthly=calendar["keep_monthly"],
        keep_yearly=calendar["keep_yearly"],
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
        all_guests=values.all_guests,
        exclude=exclude,
        mail_to=split_addresses(values.mail_to),
        ionice=as_choice(IoClass, values.ionice),
        bwlimit=_bwlimit(values, problems, name),
        restore_test=as_choice(RestoreTestWhen, values.restore_test),
        hosts=split_guests(values.hosts),
    )
    return (_keep_unedited(base, job) if base is not None else job), problems


# The Job fields build_job sets from the form; every other one is the edited job's.
FORM_EDITS = frozenset(
    {
        *("name", "guests", "destination", "device", "keep", *CALENDAR_FIELDS, "schedule"),
        *("mode", "shutdown_timeout", "on_timeout", "group", "verify", "fallback_to_stop"),
        *("hooks", "lock_wait", "all_guests", "exclude", "mail_to", "ionice", "bwlimit"),
        "restore_test",
        "hosts",
    }
)


def _keep_unedited(base: Job, job: Job) -> Job:
    """``job``, with the keys the form has no field for (mail_to...) as ``base`` had them."""
    kept: dict[str, Any] = {
        f.name: getattr(base, f.name) for f in fields(Job) if f.name not in FORM_EDITS
    }
    return replace(job, **kept)


def check_job(
    values: JobFormValues,
    *,
    existing: Sequence[Job],
    known_guests: Collection[str] | None,
    hooks: Hooks | None = None,
    base: Job | None = None,
    known_hosts: Collection[str] | None = None,
) -> tuple[Job, list[FieldError]]:
    """The job and every problem with it, at most one per field.

    ``existing`` are the other jobs (not the one being edited). ``known_guests``
    are this machine's guests, or None when they could not be listed;
    ``known_hosts`` the hosts of jobs.toml (``local`` among them).
    """
    job, problems = build_job(values, hooks=hooks, base=base)
    seen = {problem.field for problem in problems}

    def add(found: Sequence[FieldError]) -> None:
        for problem in found:
            if problem.field not in seen:
                seen.add(problem.field)
                problems.append(problem)

    add(validate_job(job, existing=existing, known_hosts=known_hosts))
    add(check_job_runtime(job))
    # A hook the runner would refuse (missing, or writable by others) is shown now.
    add([FieldError(job.name, f"hooks.{p}", m) for p, m in check_programs(job.hooks)])
    # Another host's guests are not listed here: its run says if one is missing.
    if known_guests is not None and job_hosts(job) == [LOCAL_HOST]:
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


def named_device(value: str, detected: Sequence[BlockDevice]) -> BlockDevice | None:
    """The detected device the device field names (node, UUID=... or LABEL=...), if any."""
    for device in detected:
        names = {device.node, device.spec, f"UUID={device.uuid}" if device.uuid else ""}
        if value in names or (device.label and value == f"LABEL={device.label}"):
            return device
    return None


def node_note(node: str, detected: Sequence[BlockDevice]) -> str:
    """Why the UUID form is better than the node the operator typed."""
    match = next((d for d in detected if d.node == node), None)
    if match is not None and match.uuid:
        return f"{match.spec} names this disk even after re-plugging; {node} may not"
    return f"UUID=... names a disk even after re-plugging; {node} may be another disk next time"


# --- the schedule's preview ----------------------------------------------------------


def next_runs_text(times: Sequence[datetime], time: str | None, broken: bool) -> str:
    """The line under the weekdays: the next three runs, or why there are none."""
    if broken:
        return "next: fix the time or the weekdays first"
    if time is None:
        return "next: manual only (no time set)"
    if not times:
        return "next: none"
    # One daily time: said once, then the days (a DST change moves no local time).
    days = ", ".join(f"{when:%a %m-%d}" for when in times)
    return f"next: {times[0]:%H:%M} on {days}"
