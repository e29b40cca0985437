"""Backup jobs and the ``jobs.toml`` file that holds them.

Layout: one TOML table per job under ``jobs``, the table key being the job's name.
Schedule keys sit flat in the job's table; hooks are a sub-table. Every key but
``guests`` and ``destination`` is optional and shows its default here::

    [jobs.nightly]
    guests = ["web1", "db1"]          # backed up one at a time, in this order
    destination = "/srv/backup"       # absolute; the mount point when device is set
    device = "UUID=1234-abcd"         # optional: /dev/..., UUID=... or LABEL=...
    keep = 3                          # versions kept per guest, at least 1
    time = "02:00"                    # HH:MM, 24 h; leave out for manual-only jobs
    weekdays = ["mon", "tue"]         # empty or left out: every day
    mode = "stop"                     # stop, stop-short or snapshot
    shutdown_timeout = 300            # seconds to wait for a clean shutdown
    on_timeout = "abort"              # abort or force
    group = false                     # stop all, copy, start in reverse order
    verify = true                     # read the copy back after writing it
    fallback_to_stop = false          # stop-short/snapshot: copy as in stop where push fails
    lock_wait = 1800                  # seconds to wait for a busy guest or destination
    randomized_delay = 0              # timer only: start up to this many seconds late

    [jobs.nightly.hooks]              # phase = argv, the program path absolute
    pre-stop = ["/usr/local/sbin/freeze", "--all"]
    timeout = 120                     # seconds per hook, default 300

An optional top-level ``[notify]`` table says who hears about runs; see
``notify.py`` for its keys.

Job names use ``A-Z a-z 0-9 . _ -`` (1 to 64, not starting with ``.`` or ``-``), as
they become file and systemd unit names. A name with a dot is quoted in TOML:
``[jobs."web.v2"]``.

The file is validated as a whole when loaded: unknown keys, wrong types and bad
values are errors naming the job and the key, never silently ignored, since a
mistyped ``kepp = 30`` would otherwise delete versions the operator meant to keep.
guestsafe rewrites the file atomically when a job is saved from the console or the
CLI; comments and other formatting in a hand-edited file are not kept.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import tomllib
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from guestsafe.engine.archive.names import libvirt_accepts
from guestsafe.engine.errors import ConfigError, FieldError, JobConfigError, JobNotFound
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.notify import NotifyConfig, parse_notify

MODES = ("stop", "stop-short", "snapshot")
ON_TIMEOUT = ("abort", "force")
HOOK_PHASES = (
    "job-start",
    "pre-stop",
    "post-stop",
    "pre-start",
    "post-start",
    "backup-end",
    "backup-abort",
    "job-end",
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_KEEP = 3
DEFAULT_SHUTDOWN_TIMEOUT = 300
DEFAULT_HOOK_TIMEOUT = 300
DEFAULT_LOCK_WAIT = 1800
FILE_MODE = 0o600

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_DEVICE_RES = (
    re.compile(r"/dev/[A-Za-z0-9._:+@/-]+"),
    re.compile(r"UUID=[A-Za-z0-9-]+"),
    re.compile(r"LABEL=[^\x00-\x1f\x7f]+"),
)
_JOB_KEYS = (
    "guests",
    "destination",
    "device",
    "keep",
    "time",
    "weekdays",
    "mode",
    "shutdown_timeout",
    "on_timeout",
    "group",
    "verify",
    "fallback_to_stop",
    "hooks",
    "lock_wait",
    "randomized_delay",
)
# Top-level tables other than jobs; save_jobs keeps them as they are.
_SETTINGS_KEYS = ("notify",)
_HEADER = b"# guestsafe jobs. guestsafe rewrites this file on save; comments are not kept.\n\n"


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
    keep: int = DEFAULT_KEEP
    schedule: Schedule = field(default_factory=Schedule)
    mode: str = "stop"
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT
    on_timeout: str = "abort"
    group: bool = False
    verify: bool = True
    # stop-short/snapshot on a host without libvirt push backups: copy as in stop
    # (the guest stays off for the whole copy) instead of refusing the backup.
    fallback_to_stop: bool = False
    hooks: Hooks = field(default_factory=Hooks)
    lock_wait: int = DEFAULT_LOCK_WAIT  # seconds a run waits for a busy guest or destination


# --- validation -------------------------------------------------------------


def validate_job(job: Job, *, existing: Sequence[Job] = ()) -> list[FieldError]:
    """Every problem with ``job``, without looking at the live system.

    ``existing`` are the other jobs; a job there with the same name is a clash, so
    a form editing a job passes the list without the job being edited.
    """
    checks = (
        _check_name(job.name, existing),
        _check_guests(job.guests),
        _check_destination(job.destination),
        _check_device(job.device),
        _check_count("keep", job.keep),
        _check_time(job.schedule.time),
        _check_weekdays(job.schedule.weekdays),
        _check_choice("mode", job.mode, MODES),
        _check_count("shutdown_timeout", job.shutdown_timeout),
        _check_choice("on_timeout", job.on_timeout, ON_TIMEOUT),
        _check_bool("group", job.group),
        _check_bool("verify", job.verify),
        _check_bool("fallback_to_stop", job.fallback_to_stop),
        _check_seconds("lock_wait", job.lock_wait),
        _check_seconds("randomized_delay", job.schedule.randomized_delay),
    )
    problems = [problem for problem in checks if problem is not None]
    problems += _check_hooks(job.hooks)
    return [FieldError(_job_label(job.name), f, m) for f, m in problems]


def check_job_runtime(job: Job) -> list[FieldError]:
    """Problems only the live system shows: a missing destination or device node.

    For forms and the runner's preflight; ``load_jobs`` does not call it, because
    a device may be unplugged today and present at 02:00.
    """
    problems = [_runtime_destination(job.destination), _runtime_device(job.device)]
    return [FieldError(_job_label(job.name), f, m) for f, m in filter(None, problems)]


def misconfigured_device(job: Job) -> FieldError | None:
    """The job's device path if it exists and is not a block device (a regular file).

    Unlike a missing device (unplugged today, present at 02:00, and the run's log
    says so), that is a mistake in the configuration: a run refuses it before it
    begins, as it refuses a job that does not load.
    """
    device = job.device
    if device is None or not device.startswith("/dev/") or not os.path.exists(device):
        return None
    problem = _runtime_device(device)
    return None if problem is None else FieldError(_job_label(job.name), *problem)


def _job_label(name: object) -> str:
    return name if isinstance(name, str) else repr(name)


def _check_name(name: object, existing: Sequence[Job]) -> tuple[str, str] | None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        return (
            "name",
            f"name {name!r} must be 1 to 64 of A-Z a-z 0-9 . _ - and not start with '.' or '-'",
        )
    if any(other.name == name for other in existing):
        return ("name", f"name {name!r} is taken by another job")
    return None


def _check_guests(guests: object) -> tuple[str, str] | None:
    if not isinstance(guests, list) or not all(isinstance(g, str) for g in guests):
        return ("guests", 'guests must be a list of guest names, e.g. ["web1", "db1"]')
    if not guests:
        return ("guests", "guests must list at least one guest")
    for guest in guests:
        # Any name libvirt takes (tab, RTL override, zero-width space) is a guest to
        # back up; it is shown escaped wherever it is printed.
        if not libvirt_accepts(guest):
            return ("guests", f"guests: {guest!r} is not a valid guest name")
    duplicates = sorted({g for g in guests if guests.count(g) > 1})
    if duplicates:
        return ("guests", f"guests lists {duplicates[0]!r} more than once")
    return None


def _check_destination(destination: object) -> tuple[str, str] | None:
    if not isinstance(destination, Path):
        return ("destination", "destination must be a path string")
    if not destination.is_absolute():
        return ("destination", f"destination must be an absolute path, not '{destination}'")
    if destination == Path("/"):
        # A device would be mounted over the root filesystem.
        return ("destination", "destination must not be '/'")
    if not str(destination).isprintable():
        return ("destination", f"destination {str(destination)!r} holds control characters")
    return None


def _check_device(device: object) -> tuple[str, str] | None:
    if device is None:
        return None
    if not isinstance(device, str):
        return ("device", 'device must be a string like "/dev/sdb1", "UUID=..." or "LABEL=..."')
    if not any(pattern.fullmatch(device) for pattern in _DEVICE_RES) or "/../" in device:
        return ("device", f"device {device!r} must be /dev/..., UUID=... or LABEL=...")
    return None


def _check_count(name: str, value: object) -> tuple[str, str] | None:
    # bool is an int in Python, but `keep = true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        return (name, f"{name} must be a whole number, not {value!r}")
    if value < 1:
        return (name, f"{name} must be at least 1, not {value}")
    return None


def _check_seconds(name: str, value: object) -> tuple[str, str] | None:
    # Like _check_count, but 0 is meaningful: no wait, no delay.
    if not isinstance(value, int) or isinstance(value, bool):
        return (name, f"{name} must be a whole number of seconds, not {value!r}")
    if value < 0:
        return (name, f"{name} must be 0 or more seconds, not {value}")
    return None


def _check_time(time: object) -> tuple[str, str] | None:
    if time is None:
        return None
    if not isinstance(time, str) or not _TIME_RE.fullmatch(time):
        return ("time", f'time must be "HH:MM" from 00:00 to 23:59, not {time!r}')
    return None


def _check_weekdays(weekdays: object) -> tuple[str, str] | None:
    if not isinstance(weekdays, list) or not all(isinstance(d, str) for d in weekdays):
        return ("weekdays", 'weekdays must be a list like ["mon", "fri"]')
    for day in weekdays:
        if day not in WEEKDAYS:
            return ("weekdays", f"weekdays: {day!r} is not one of {', '.join(WEEKDAYS)}")
        if weekdays.count(day) > 1:
            return ("weekdays", f"weekdays lists {day!r} more than once")
    return None


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> tuple[str, str] | None:
    if value not in allowed:
        return (name, f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return None


def _check_bool(name: str, value: object) -> tuple[str, str] | None:
    if not isinstance(value, bool):
        return (name, f"{name} must be true or false, not {value!r}")
    return None


def _check_hooks(hooks: object) -> list[tuple[str, str]]:
    if not isinstance(hooks, Hooks):
        return [("hooks", "hooks must be a table of phase = [program, args...]")]
    problems = [_check_hook(phase, argv) for phase, argv in hooks.commands.items()]
    timeout = _check_count("hooks.timeout", hooks.timeout)
    return [p for p in (*problems, timeout) if p is not None]


def _check_hook(phase: object, argv: object) -> tuple[str, str] | None:
    if phase not in HOOK_PHASES:
        phases = ", ".join(HOOK_PHASES)
        return (f"hooks.{phase}", f"hooks: unknown phase {phase!r}; phases are {phases}")
    name = f"hooks.{phase}"
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return (name, f'{name} must be a list like ["/usr/local/sbin/prog", "arg"]')
    if any("\x00" in arg for arg in argv):
        return (name, f"{name} holds a NUL character")
    if not argv[0].startswith("/"):
        return (name, f"{name} must start with an absolute program path, not {argv[0]!r}")
    return None


def _runtime_destination(destination: Path) -> tuple[str, str] | None:
    try:
        mode = destination.stat().st_mode
    except FileNotFoundError:
        return ("destination", f"destination {destination} does not exist")
    except OSError as exc:
        return ("destination", f"destination {destination}: {exc.strerror}")
    if not stat.S_ISDIR(mode):
        return ("destination", f"destination {destination} is not a directory")
    return None


def _runtime_device(device: str | None) -> tuple[str, str] | None:
    # UUID= and LABEL= are resolved by the device layer when the job runs.
    if device is None or not device.startswith("/dev/"):
        return None
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError:
        return ("device", f"device {device} does not exist; is the disk plugged in?")
    except OSError as exc:
        return ("device", f"device {device}: {exc.strerror}")
    if not stat.S_ISBLK(mode):
        return ("device", f"device {device} is not a block device")
    return None


# --- reading ----------------------------------------------------------------


def load_jobs(path: Path) -> list[Job]:
    """The jobs in ``path``, in file order; a missing file holds no jobs.

    Raises ``JobConfigError`` (a ``ConfigError``) naming the file, and the job and
    key at fault, for anything that is not a valid job.
    """
    document = _read_toml(path)
    if document is None:
        return []
    jobs, problems = _parse_document(document)
    if problems:
        raise _invalid(path, problems)
    return jobs


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line N, column M)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _invalid(path: Path, problems: Sequence[FieldError]) -> JobConfigError:
    more = len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return JobConfigError(f"{path}: {problems[0]}{suffix}", problems)


def _parse_document(document: dict[str, Any]) -> tuple[list[Job], list[FieldError]]:
    problems: list[FieldError] = []
    for key in document:
        if key != "jobs" and key not in _SETTINGS_KEYS:
            message = f"unknown top-level key {key!r}; jobs go in [jobs.<name>] tables"
            problems.append(FieldError("", key, message))
    _config, notify_problems = parse_notify(document.get("notify", {}))
    problems += [FieldError("", f, m) for f, m in notify_problems]
    tables = document.get("jobs", {})
    if not isinstance(tables, dict):
        problems.append(FieldError("", "jobs", "jobs must be tables like [jobs.nightly]"))
        return [], problems
    jobs: list[Job] = []
    for name, table in tables.items():
        job, job_problems = _parse_job(name, table)
        problems.extend(job_problems)
        if job is not None:
            jobs.append(job)
    return jobs, problems


def _parse_job(name: str, table: object) -> tuple[Job | None, list[FieldError]]:
    if not isinstance(table, dict):
        return None, [FieldError(name, "", f"[jobs.{name}] must be a table of settings")]
    problems = [FieldError(name, k, f"unknown key {k!r}") for k in table if k not in _JOB_KEYS]
    problems += [
        FieldError(name, k, f"{k} is required") for k in ("guests", "destination") if k not in table
    ]
    hooks, hook_problems = _parse_hooks(name, table.get("hooks", {}))
    job = Job(
        name=name,
        guests=table.get("guests", []),
        destination=_as_path(table.get("destination", "")),
        device=table.get("device"),
        keep=table.get("keep", DEFAULT_KEEP),
        schedule=Schedule(
            time=table.get("time"),
            weekdays=table.get("weekdays", []),
            randomized_delay=table.get("randomized_delay", 0),
        ),
        mode=table.get("mode", "stop"),
        shutdown_timeout=table.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
        on_timeout=table.get("on_timeout", "abort"),
        group=table.get("group", False),
        verify=table.get("verify", True),
        fallback_to_stop=table.get("fallback_to_stop", False),
        hooks=hooks,
        lock_wait=table.get("lock_wait", DEFAULT_LOCK_WAIT),
    )
    # A missing or malformed field is reported once, by the parser.
    reported = {problem.field for problem in problems + hook_problems}
    checked = [p for p in validate_job(job) if p.field not in reported]
    return job, problems + hook_problems + checked


def _as_path(value: Any) -> Any:
    # Anything but a string stays as it is, so validation can name its type.
    return Path(value) if isinstance(value, str) else value


def _parse_hooks(name: str, table: object) -> tuple[Hooks, list[FieldError]]:
    if not isinstance(table, dict):
        problem = FieldError(name, "hooks", f"hooks must be a table like [jobs.{name}.hooks]")
        return Hooks(), [problem]
    # Unknown phases stay in, so validate_job reports them like a form's would.
    commands = {phase: argv for phase, argv in table.items() if phase != "timeout"}
    return Hooks(commands, table.get("timeout", DEFAULT_HOOK_TIMEOUT)), []


# --- writing ----------------------------------------------------------------


def save_jobs(path: Path, jobs: Sequence[Job]) -> None:
    """Validate ``jobs`` and replace ``path`` with them atomically, mode 0600.

    Output is deterministic: jobs in list order, keys in the documented order,
    defaults written out so the file shows every setting.
    """
    problems = _validate_all(jobs)
    if problems:
        raise _invalid(path, problems)
    document = {"jobs": {job.name: _job_table(job) for job in jobs}} | _kept_settings(path)
    data = _HEADER + tomli_w.dumps(document).encode()
    # Write through a symlink to the real file, as config management may link it.
    target = path.resolve()
    try:
        atomic_write_bytes(target, data, mode=FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


def _kept_settings(path: Path) -> dict[str, Any]:
    """The settings tables (``[notify]``) of the file being replaced, unchanged."""
    try:
        document = _read_toml(path) or {}
    except ConfigError:
        return {}  # nothing readable to keep; load_jobs has refused such a file anyway
    return {key: document[key] for key in _SETTINGS_KEYS if key in document}


def load_notify(path: Path) -> NotifyConfig:
    """The ``[notify]`` table of ``path``; nothing is sent when there is none."""
    document = _read_toml(path) or {}
    config, problems = parse_notify(document.get("notify", {}))
    if problems:
        raise _invalid(path, [FieldError("", f, m) for f, m in problems])
    return config


def upsert_job(path: Path, job: Job, *, previous_name: str | None = None) -> None:
    """Add ``job``, or replace the job of the same name, keeping its place.

    ``previous_name`` renames: the job saved under that name is replaced. Raises
    ``JobConfigError`` if ``job`` is invalid and ``JobNotFound`` if
    ``previous_name`` does not exist.
    """
    replaces = previous_name if previous_name is not None else job.name
    with _config_lock(path):
        jobs = load_jobs(path)
        others = [j for j in jobs if j.name != replaces]
        if previous_name is not None and len(others) == len(jobs):
            raise JobNotFound(f"job {previous_name!r} not found in {path}")
        problems = validate_job(job, existing=others)
        if problems:
            raise _invalid(path, problems)
        names = [j.name for j in jobs]
        if replaces in names:
            jobs[names.index(replaces)] = job
        else:
            jobs.append(job)
        save_jobs(path, jobs)


def delete_job(path: Path, name: str) -> None:
    """Remove the job called ``name``; ``JobNotFound`` if there is none."""
    with _config_lock(path):
        jobs = load_jobs(path)
        kept = [job for job in jobs if job.name != name]
        if len(kept) == len(jobs):
            raise JobNotFound(f"job {name!r} not found in {path}")
        save_jobs(path, kept)


def _validate_all(jobs: Sequence[Job]) -> list[FieldError]:
    problems: list[FieldError] = []
    for index, job in enumerate(jobs):
        problems += validate_job(job, existing=jobs[:index])
    return problems


def _job_table(job: Job) -> dict[str, Any]:
    table: dict[str, Any] = {"guests": list(job.guests), "destination": str(job.destination)}
    if job.device is not None:
        table["device"] = job.device
    table["keep"] = job.keep
    if job.schedule.time is not None:
        table["time"] = job.schedule.time
    table["weekdays"] = list(job.schedule.weekdays)
    table["randomized_delay"] = job.schedule.randomized_delay
    table |= {
        "mode": job.mode,
        "shutdown_timeout": job.shutdown_timeout,
        "on_timeout": job.on_timeout,
        "group": job.group,
        "verify": job.verify,
        "fallback_to_stop": job.fallback_to_stop,
        "lock_wait": job.lock_wait,
    }
    hooks: dict[str, Any] = {p: list(job.hooks[p]) for p in HOOK_PHASES if p in job.hooks}
    if hooks or job.hooks.timeout != DEFAULT_HOOK_TIMEOUT:
        table["hooks"] = hooks | {"timeout": job.hooks.timeout}
    return table


@contextmanager
def _config_lock(path: Path) -> Iterator[None]:
    """Serialise load-modify-save between the console, the CLI and the timer.

    flock on the config directory itself, so no lock file litters /etc; the lock
    goes with the process if it dies.
    """
    try:
        fd = os.open(path.resolve().parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {path.parent}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
