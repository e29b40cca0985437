"""Checking a job: what the file or the form says, and what only the live system shows."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from guestsafe.engine.archive.names import libvirt_accepts
from guestsafe.engine.errors import FieldError, JobConfigError
from guestsafe.engine.jobs.hosts_config import check_host_name
from guestsafe.engine.jobs.model import (
    CALENDAR_KEYS,
    CHAIN_MODES,
    HOOK_PHASES,
    IO_CLASSES,
    MODES,
    ON_TIMEOUT,
    RESTORE_TESTS,
    WEEKDAYS,
    Hooks,
    Job,
)
from guestsafe.engine.notify import check_mail_to
from guestsafe.engine.sizes import byte_rate, parse_byte_rate

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_DEVICE_RES = (
    re.compile(r"/dev/[A-Za-z0-9._:+@/-]+"),
    re.compile(r"UUID=[A-Za-z0-9-]+"),
    re.compile(r"LABEL=[^\x00-\x1f\x7f]+"),
)
# Below this a disk of a few GiB takes hours: a typo (100 B/s for 100 MiB/s), not a wish.
MIN_BWLIMIT = 1024 * 1024
_BWLIMIT_EXAMPLE = 'like "100 MiB/s" (or 0 for no limit)'


def validate_job(
    job: Job, *, existing: Sequence[Job] = (), known_hosts: Collection[str] | None = None
) -> list[FieldError]:
    """Every problem with ``job``, without looking at the live system.

    ``existing`` are the other jobs; a job there with the same name is a clash, so
    a form editing a job passes the list without the job being edited.
    ``known_hosts``: the hosts jobs.toml defines (``local`` among them); a job
    naming another is refused. None: the host names' shape alone is checked.
    """
    checks = (
        _check_name(job.name, existing),
        _check_hosts(job.hosts, known_hosts),
        _check_guests(job.guests) if not job.all_guests else _check_all_guests(job.guests),
        _check_exclude(job.exclude, job.all_guests),
        _check_mail_to(job.mail_to),
        _check_choice("ionice", job.ionice, IO_CLASSES),
        _check_bwlimit(job.bwlimit),
        _check_destination(job.destination),
        _check_device(job.device),
        *_check_retention(job),
        _check_time(job.schedule.time),
        _check_weekdays(job.schedule.weekdays),
        _check_choice("mode", job.mode, MODES),
        _check_count("shutdown_timeout", job.shutdown_timeout),
        _check_choice("on_timeout", job.on_timeout, ON_TIMEOUT),
        _check_bool("group", job.group),
        _check_bool("verify", job.verify),
        _check_bool("fallback_to_stop", job.fallback_to_stop),
        _check_bool("include_readonly", job.include_readonly),
        _check_seconds("lock_wait", job.lock_wait),
        _check_seconds("randomized_delay", job.schedule.randomized_delay),
        _check_choice("chain", job.chain, CHAIN_MODES),
        _check_choice("restore_test", job.restore_test, RESTORE_TESTS),
        _check_console_line(job.restore_test_console),
        _check_count("restore_test_seconds", job.restore_test_seconds),
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
        return ("guests", 'guests must be a list of guest names, e.g. ["web1", "db1"], or "all"')
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


def _check_hosts(hosts: object, known: Collection[str] | None) -> tuple[str, str] | None:
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        return ("hosts", 'hosts must be a list of host names, e.g. ["local", "node2"]')
    for host in hosts:
        wrong = check_host_name(host)
        if wrong is not None:
            return ("hosts", f"hosts: {wrong}")
        if known is not None and host not in known:
            defined = ", ".join(sorted(known))
            return ("hosts", f"host {host!r} is not defined; add [hosts.{host}] (known: {defined})")
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        return ("hosts", f"hosts lists {duplicates[0]!r} more than once")
    return None


def _check_all_guests(guests: object) -> tuple[str, str] | None:
    if guests:
        return ("guests", 'guests = "all" backs up every guest; list no guest names beside it')
    return None


def _check_exclude(exclude: object, all_guests: object) -> tuple[str, str] | None:
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        return ("exclude", 'exclude must be a list of name patterns, e.g. ["scratch-*"]')
    if exclude and all_guests is not True:
        return (
            "exclude",
            'exclude applies only with guests = "all"; with listed guests, leave the others out',
        )
    for pattern in exclude:
        if not pattern or not pattern.isprintable():
            return ("exclude", f"exclude: {pattern!r} is not a name pattern")
    return None


def _check_mail_to(mail_to: object) -> tuple[str, str] | None:
    problem = check_mail_to("mail_to", mail_to)
    return None if problem is None else ("mail_to", problem)


def _check_bwlimit(value: object) -> tuple[str, str] | None:
    if isinstance(value, str):  # what the file said, not understood by the parser
        try:
            parse_bwlimit(value)
        except JobConfigError as exc:
            return ("bwlimit", exc.problems[0].message)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return ("bwlimit", f"bwlimit must be a rate {_BWLIMIT_EXAMPLE}, not {value!r}")
    if value < MIN_BWLIMIT:
        return ("bwlimit", f"bwlimit must be at least 1 MiB/s, not {byte_rate(value)}")
    return None


def parse_bwlimit(text: str | int | None) -> int | None:
    """Bytes per second in a ``bwlimit`` (``"100 MiB/s"``, or a whole number of bytes/s).

    ``0``, ``"0"``, ``""`` and None mean no limit (None). Anything else not a rate
    of at least 1 MiB/s raises ``JobConfigError`` whose one problem names the field.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, bool) or not isinstance(text, str | int):
        return _bad_bwlimit(f"bwlimit must be a rate {_BWLIMIT_EXAMPLE}, not {text!r}")
    if isinstance(text, int):
        rate = text
    else:
        try:
            rate = parse_byte_rate(text)
        except ValueError:
            return _bad_bwlimit(f"bwlimit must be a rate {_BWLIMIT_EXAMPLE}, not {text!r}")
    if rate == 0:
        return None
    if rate < MIN_BWLIMIT:
        return _bad_bwlimit(f"bwlimit must be at least 1 MiB/s, not {byte_rate(rate)}")
    return rate


def _bad_bwlimit(message: str) -> int | None:
    raise JobConfigError(message, [FieldError("", "bwlimit", message)])


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


def _check_retention(job: Job) -> list[tuple[str, str] | None]:
    counts = {"keep": job.keep} | {key: getattr(job, key) for key in CALENDAR_KEYS}
    if not any(counts[key] for key in CALENDAR_KEYS):
        return [_check_count("keep", job.keep)]  # keep = N alone, as before: at least 1
    # A calendar rule is set and non-zero, so at least one version is kept.
    return [_check_whole(key, value) for key, value in counts.items()]


def _check_whole(name: str, value: object) -> tuple[str, str] | None:
    # A calendar rule may be 0 (off); so may keep beside one.
    if not isinstance(value, int) or isinstance(value, bool):
        return (name, f"{name} must be a whole number, not {value!r}")
    if value < 0:
        return (name, f"{name} must be 0 or more, not {value}")
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


def _check_console_line(value: object) -> tuple[str, str] | None:
    # Matched against the serial console's text: a control character never shows there.
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or _has_control(value):
        return (
            "restore_test_console",
            f'restore_test_console must be a line of text the console prints, like "login:", '
            f"not {value!r}",
        )
    return None


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


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
