"""The ``jobs.toml`` file that holds the backup jobs: reading, writing, editing.

Layout: one TOML table per job under ``jobs``, the table key being the job's name.
Schedule keys sit flat in the job's table; hooks are a sub-table. Every key but
``guests`` and ``destination`` is optional and shows its default here::

    [jobs.nightly]
    guests = ["web1", "db1"]          # backed up one at a time, in this order
    destination = "/srv/backup"       # absolute; the mount point when device is set
    device = "UUID=1234-abcd"         # optional: /dev/..., UUID=... or LABEL=...
    keep = 3                          # good versions kept per guest (keep_last means the same)
    keep_daily = 0                    # calendar rules as restic's forget: the newest version
    keep_weekly = 0                   #   of each of the last N days, ISO weeks, months, years;
    keep_monthly = 0                  #   with only these set, keep defaults to 0
    keep_yearly = 0                   #   (FORMAT.md, section 11)
    time = "02:00"                    # HH:MM, 24 h; leave out for manual-only jobs
    weekdays = ["mon", "tue"]         # empty or left out: every day
    mode = "stop"                     # stop, stop-short or snapshot
    shutdown_timeout = 300            # seconds to wait for a clean shutdown
    on_timeout = "abort"              # abort or force
    group = false                     # stop all, copy, start in reverse order
    verify = true                     # read the copy back after writing it
    fallback_to_stop = false          # stop-short/snapshot: copy as in stop where push fails
    include_readonly = false          # also copy read-only disks and CD/floppy images
    lock_wait = 1800                  # seconds to wait for a busy guest or destination
    randomized_delay = 0              # timer only: start up to this many seconds late
    mail_to = ["ops@example.org"]     # optional: this job's mail goes here, not [notify]'s
    ionice = "idle"                   # the copier's I/O class: idle or best-effort
    bwlimit = "100 MiB/s"             # optional: the copier writes at most this (0: no limit)
    chain = "flatten"                 # qcow2 overlays: flatten (one file) or keep (every layer)
    restore_test = "never"            # boot the new version cut off from the network: never,
                                      #   weekly or always (after every backup)
    restore_test_console = "login:"   # optional: the serial console line that proves a boot
    restore_test_seconds = 60         # how long to wait for a sign of life

    [jobs.everything]
    guests = "all"                    # every persistent guest defined when the run starts
    destination = "/srv/backup"
    exclude = ["scratch-*"]           # optional, only with "all": glob patterns left out

    [jobs.nightly.hooks]              # phase = argv, the program path absolute
    pre-stop = ["/usr/local/sbin/freeze", "--all"]
    timeout = 120                     # seconds per hook, default 300

An optional top-level ``[notify]`` table says who hears about runs; see
``notify.py`` for its keys. ``[hosts.NAME]`` tables name other hypervisor hosts
(``hosts_config.py``); a job backs up the guests of one with ``host = "node2"``, or
of several with ``hosts = ["local", "node2"]``; without either, this machine's::

    [hosts.node2]
    uri = "qemu+ssh://root@node2/system"

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
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from guestsafe.engine.errors import ConfigError, FieldError, JobConfigError, JobNotFound
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.jobs.hosts_config import LOCAL_HOST, Host, host_names, parse_hosts
from guestsafe.engine.jobs.model import (
    CALENDAR_KEYS,
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_KEEP,
    DEFAULT_LOCK_WAIT,
    DEFAULT_RESTORE_TEST_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HOOK_PHASES,
    Hooks,
    Job,
    RestoreTestWhen,
    Schedule,
    as_choice,
)
from guestsafe.engine.jobs.validation import parse_bwlimit, validate_job
from guestsafe.engine.modes import ChainMode, IoClass, Mode, OnTimeout
from guestsafe.engine.notify import NotifyConfig, parse_notify
from guestsafe.engine.sizes import byte_rate

FILE_MODE = 0o600
_JOB_KEYS = (
    "guests",
    "destination",
    "device",
    "keep",
    "keep_last",
    *CALENDAR_KEYS,
    "time",
    "weekdays",
    "mode",
    "shutdown_timeout",
    "on_timeout",
    "group",
    "verify",
    "fallback_to_stop",
    "include_readonly",
    "hooks",
    "lock_wait",
    "randomized_delay",
    "exclude",
    "mail_to",
    "ionice",
    "bwlimit",
    "chain",
    "restore_test",
    "restore_test_console",
    "restore_test_seconds",
    "host",
    "hosts",
)
ALL_GUESTS = "all"  # guests = "all"
# Top-level tables other than jobs; save_jobs keeps them as they are.
_SETTINGS_KEYS = ("notify", "hosts")
_HEADER = b"# guestsafe jobs. guestsafe rewrites this file on save; comments are not kept.\n\n"


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
    hosts, host_problems = parse_hosts(document.get("hosts", {}))
    problems += [FieldError("", f, m) for f, m in host_problems]
    # A host whose table is wrong is still known, so its jobs are not blamed for it.
    known = set(host_names(hosts)) | _table_names(document.get("hosts"))
    tables = document.get("jobs", {})
    if not isinstance(tables, dict):
        problems.append(FieldError("", "jobs", "jobs must be tables like [jobs.nightly]"))
        return [], problems
    jobs: list[Job] = []
    for name, table in tables.items():
        job, job_problems = _parse_job(name, table, known)
        problems.extend(job_problems)
        if job is not None:
            jobs.append(job)
    return jobs, problems


def _table_names(table: object) -> set[str]:
    return {name for name in table if isinstance(name, str)} if isinstance(table, dict) else set()


def _parse_job(
    name: str, table: object, known_hosts: set[str] | None = None
) -> tuple[Job | None, list[FieldError]]:
    if not isinstance(table, dict):
        return None, [FieldError(name, "", f"[jobs.{name}] must be a table of settings")]
    problems = [FieldError(name, k, f"unknown key {k!r}") for k in table if k not in _JOB_KEYS]
    problems += [
        FieldError(name, k, f"{k} is required") for k in ("guests", "destination") if k not in table
    ]
    if "keep" in table and "keep_last" in table:
        message = "keep and keep_last mean the same; set only one of them"
        problems.append(FieldError(name, "keep_last", message))
    if "host" in table and "hosts" in table:
        message = 'set host = "node2" or hosts = ["node1", "node2"], not both'
        problems.append(FieldError(name, "hosts", message))
    hooks, hook_problems = _parse_hooks(name, table.get("hooks", {}))
    job = Job(
        name=name,
        guests=[] if table.get("guests") == ALL_GUESTS else table.get("guests", []),
        destination=_as_path(table.get("destination", "")),
        device=table.get("device"),
        keep=_keep_last(table),
        keep_daily=table.get("keep_daily", 0),
        keep_weekly=table.get("keep_weekly", 0),
        keep_monthly=table.get("keep_monthly", 0),
        keep_yearly=table.get("keep_yearly", 0),
        schedule=Schedule(
            time=table.get("time"),
            weekdays=table.get("weekdays", []),
            randomized_delay=table.get("randomized_delay", 0),
        ),
        mode=as_choice(Mode, table.get("mode", Mode.STOP)),
        shutdown_timeout=table.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
        on_timeout=as_choice(OnTimeout, table.get("on_timeout", OnTimeout.ABORT)),
        group=table.get("group", False),
        verify=table.get("verify", True),
        fallback_to_stop=table.get("fallback_to_stop", False),
        include_readonly=table.get("include_readonly", False),
        hooks=hooks,
        lock_wait=table.get("lock_wait", DEFAULT_LOCK_WAIT),
        all_guests=table.get("guests") == ALL_GUESTS,
        exclude=table.get("exclude", []),
        mail_to=_one_or_list(table.get("mail_to", [])),
        ionice=as_choice(IoClass, table.get("ionice", IoClass.IDLE)),
        bwlimit=_bwlimit(table.get("bwlimit")),
        chain=as_choice(ChainMode, table.get("chain", ChainMode.FLATTEN)),
        restore_test=as_choice(RestoreTestWhen, table.get("restore_test", RestoreTestWhen.NEVER)),
        restore_test_console=table.get("restore_test_console"),
        restore_test_seconds=table.get("restore_test_seconds", DEFAULT_RESTORE_TEST_SECONDS),
        hosts=_job_hosts(table),
    )
    # A missing or malformed field is reported once, by the parser.
    reported = {problem.field for problem in problems + hook_problems}
    checked = [p for p in validate_job(job, known_hosts=known_hosts) if p.field not in reported]
    return job, problems + hook_problems + checked


def _keep_last(table: dict[str, Any]) -> Any:
    """``keep`` or its other name ``keep_last``; the default depends on the calendar rules.

    With only calendar rules set (``keep_daily = 7``) the operator asked for those
    alone, as in restic; otherwise the default ``keep = 3`` holds.
    """
    if "keep" in table or "keep_last" in table:
        return table.get("keep", table.get("keep_last"))
    return 0 if any(key in table for key in CALENDAR_KEYS) else DEFAULT_KEEP


def _job_hosts(table: dict[str, Any]) -> Any:
    """``host = "node2"`` is ``hosts = ["node2"]``; a wrong type stays for validation."""
    if "host" in table:
        host = table["host"]
        return [host] if isinstance(host, str) else host
    return table.get("hosts", [])


def _one_or_list(value: Any) -> Any:
    # mail_to = "ops@example.org" is one recipient, as in [notify].
    return [value] if isinstance(value, str) else value


def _bwlimit(value: Any) -> Any:
    """Bytes per second; a value the parser refuses stays, for validate_job to name."""
    try:
        return parse_bwlimit(value)
    except JobConfigError:
        return value


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
    problems = _validate_all(jobs, _known_hosts(path))
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
    """The settings tables (``[notify]``, ``[hosts]``) of the file being replaced, unchanged."""
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


def load_hosts(path: Path) -> dict[str, Host]:
    """The ``[hosts.NAME]`` tables of ``path``, by name; ``local`` is never among them."""
    document = _read_toml(path) or {}
    hosts, problems = parse_hosts(document.get("hosts", {}))
    if problems:
        raise _invalid(path, [FieldError("", f, m) for f, m in problems])
    return hosts


def _known_hosts(path: Path) -> set[str]:
    try:
        return set(host_names(load_hosts(path)))
    except ConfigError:
        return {LOCAL_HOST}  # load_jobs names the file's problem; no job may use its hosts


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
        problems = validate_job(job, existing=others, known_hosts=_known_hosts(path))
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


def _validate_all(jobs: Sequence[Job], known_hosts: set[str]) -> list[FieldError]:
    problems: list[FieldError] = []
    for index, job in enumerate(jobs):
        problems += validate_job(job, existing=jobs[:index], known_hosts=known_hosts)
    return problems


def _job_table(job: Job) -> dict[str, Any]:
    guests: Any = ALL_GUESTS if job.all_guests else list(job.guests)
    table: dict[str, Any] = {"guests": guests, "destination": str(job.destination)}
    if job.exclude:
        table["exclude"] = list(job.exclude)
    if job.device is not None:
        table["device"] = job.device
    table["keep"] = job.keep
    table |= {key: getattr(job, key) for key in CALENDAR_KEYS if getattr(job, key)}
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
        "ionice": job.ionice,
    }
    if job.bwlimit:
        table["bwlimit"] = byte_rate(job.bwlimit)
    if job.mail_to:
        table["mail_to"] = list(job.mail_to)
    if job.chain != ChainMode.FLATTEN:
        table["chain"] = job.chain
    if job.include_readonly:
        table["include_readonly"] = True
    if job.restore_test != RestoreTestWhen.NEVER:
        table["restore_test"] = job.restore_test
    if job.restore_test_console:
        table["restore_test_console"] = job.restore_test_console
    if job.restore_test_seconds != DEFAULT_RESTORE_TEST_SECONDS:
        table["restore_test_seconds"] = job.restore_test_seconds
    if len(job.hosts) == 1:
        table["host"] = job.hosts[0]
    elif job.hosts:
        table["hosts"] = list(job.hosts)
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
