"""Backup jobs: the ``Job`` a run follows, its parts, and the choices they take.

A job is built from what ``jobs.toml`` (``jobs_file.py``) or the console's form
says and only then checked (``validation.py``), so that every problem is named
with its job and key at once: a field may hold any value until
``validate_job`` has passed it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar, cast

from guestsafe.engine.archive.calendar_retention import RetentionPolicy
from guestsafe.engine.jobs.hosts_config import LOCAL_HOST
from guestsafe.engine.modes import ChainMode, IoClass, Mode, OnTimeout


class HookPhase(StrEnum):
    """The points in a run where a hook may run; the keys of ``[jobs.<name>.hooks]``."""

    JOB_START = "job-start"
    PRE_STOP = "pre-stop"
    POST_STOP = "post-stop"
    PRE_START = "pre-start"
    POST_START = "post-start"
    BACKUP_END = "backup-end"
    BACKUP_ABORT = "backup-abort"
    JOB_END = "job-end"


class Weekday(StrEnum):
    """A day of ``weekdays``; in Python's order (``date.weekday()`` indexes it)."""

    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"


class RestoreTestWhen(StrEnum):
    """When a job boots its new version as a restore test (restore/boottest/)."""

    NEVER = "never"
    WEEKLY = "weekly"  # when no version of the guest was tested in the last 7 days
    ALWAYS = "always"  # after every backup


# The choices in file and form order, for the forms and the messages that list them.
MODES: tuple[str, ...] = tuple(Mode)
ON_TIMEOUT: tuple[str, ...] = tuple(OnTimeout)
IO_CLASSES: tuple[str, ...] = tuple(IoClass)
CHAIN_MODES: tuple[str, ...] = tuple(ChainMode)
HOOK_PHASES: tuple[str, ...] = tuple(HookPhase)
WEEKDAYS: tuple[str, ...] = tuple(Weekday)
RESTORE_TESTS: tuple[str, ...] = tuple(RestoreTestWhen)
DEFAULT_RESTORE_TEST_SECONDS = 60
DEFAULT_KEEP = 3
# The calendar rules' keys, beside keep (alias keep_last), in the file and the Job.
CALENDAR_KEYS: tuple[str, ...] = ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
DEFAULT_SHUTDOWN_TIMEOUT = 300
DEFAULT_HOOK_TIMEOUT = 300
DEFAULT_LOCK_WAIT = 1800


@dataclass
class Hooks(MutableMapping[str, list[str]]):
    """Hook commands by phase (``hooks["pre-stop"]``), plus one timeout for each."""

    commands: dict[str, list[str]] = field(default_factory=dict)
    timeout: int = DEFAULT_HOOK_TIMEOUT

    def __getitem__(self, phase: str) -> list[str]:
        return self.commands[phase]

    def __setitem__(self, phase: str, argv: list[str]) -> None:
        self.commands[phase] = argv

    def __delitem__(self, phase: str) -> None:
        del self.commands[phase]

    def __iter__(self) -> Iterator[str]:
        return iter(self.commands)

    def __len__(self) -> int:
        return len(self.commands)


@dataclass
class Schedule:
    time: str | None = None  # "HH:MM"; None: the job runs only when started by hand
    weekdays: list[str] = field(default_factory=list)  # empty: every day
    randomized_delay: int = 0  # seconds a timer may start late, spreading load


@dataclass
class Job:
    name: str
    guests: list[str]
    destination: Path
    device: str | None = None
    keep: int = DEFAULT_KEEP  # keep_last in jobs.toml means the same (FORMAT.md, section 11)
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    schedule: Schedule = field(default_factory=Schedule)
    mode: Mode = Mode.STOP
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT
    on_timeout: OnTimeout = OnTimeout.ABORT
    group: bool = False
    verify: bool = True
    # stop-short/snapshot on a host without libvirt push backups: copy as in stop
    # (the guest stays off for the whole copy) instead of refusing the backup.
    fallback_to_stop: bool = False
    # Read-only disks and CD/floppy images are recorded in the manifest, not copied,
    # unless this says so (they are usually install media kept elsewhere).
    include_readonly: bool = False
    hooks: Hooks = field(default_factory=Hooks)
    lock_wait: int = DEFAULT_LOCK_WAIT  # seconds a run waits for a busy guest or destination
    # guests = "all": every persistent guest defined when the run starts, but those
    # an exclude pattern (fnmatch) matches; ``guests`` is then empty.
    all_guests: bool = False
    exclude: list[str] = field(default_factory=list)
    mail_to: list[str] = field(default_factory=list)  # replaces [notify] mail_to for this job
    ionice: IoClass = IoClass.IDLE  # the copier's I/O class
    bwlimit: int | None = None  # bytes per second the copier writes at most; None: no cap
    # A disk on a qcow2 backing chain: one flattened file, or every file of the chain.
    chain: ChainMode = ChainMode.FLATTEN
    # Restore tests: when, the console line that proves a boot, how long to wait.
    restore_test: RestoreTestWhen = RestoreTestWhen.NEVER
    restore_test_console: str | None = None
    restore_test_seconds: int = DEFAULT_RESTORE_TEST_SECONDS
    # The hosts whose guests this job backs up ([hosts.NAME] in jobs.toml, "local" for
    # this machine); empty: this machine alone, as before hosts existed.
    hosts: list[str] = field(default_factory=list)


_Choice = TypeVar("_Choice", bound=StrEnum)


def as_choice(kind: type[_Choice], value: object) -> _Choice:
    """The member of ``kind`` spelled ``value``; any other value is passed through.

    A job is built from what the file or the form says and validated afterwards,
    so an unknown spelling must reach ``validate_job`` to be named in its message.
    """
    if isinstance(value, str) and value in {member.value for member in kind}:
        return kind(value)
    return cast(_Choice, value)


def job_hosts(job: Job) -> list[str]:
    """The hosts ``job`` backs up guests of, ``local`` when it names none."""
    return list(job.hosts) or [LOCAL_HOST]


def retention_policy(job: Job) -> RetentionPolicy:
    """The archive's retention policy for ``job``: ``keep`` is its ``keep_last``."""
    return RetentionPolicy(
        last=job.keep,
        daily=job.keep_daily,
        weekly=job.keep_weekly,
        monthly=job.keep_monthly,
        yearly=job.keep_yearly,
    )
