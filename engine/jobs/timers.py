"""systemd timer units for the jobs' schedules.

``install_timers`` writes one ``guestsafe-<job>.timer`` and ``.service`` pair
per scheduled job, plus ``guestsafe_timers.path`` and its service, which run
``schedule install`` again whenever the jobs file changes (a hand edit, say).
Every file guestsafe writes starts with ``UNIT_MARKER``, and only files carrying
it are ever replaced or removed, so an administrator's own units named
``guestsafe-*`` are safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from guestsafe.engine.errors import ConfigError
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.schedule import on_calendar
from guestsafe.engine.paths import HOME_ENV

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
UNIT_DIR_ENV = "GUESTSAFE_UNIT_DIR"
UNIT_PREFIX = "guestsafe-"
UNIT_MARKER = "# Written by guestsafe schedule install; guestsafe rewrites or removes it.\n"
# The path unit that reruns `schedule install` when the jobs file changes, so a
# hand edit reaches the timers too. "_" keeps it apart from every job's units.
WATCH = "guestsafe_timers"
WANTS_DIRS = {".timer": "timers.target.wants", ".path": "paths.target.wants"}
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3)'s own test
# What a cancelled run may still need after `systemctl stop`, beyond its hooks:
# the shutdown wait notices the cancel within seconds, then a push job is aborted
# (up to 30 s) and the guest started again (a few seconds, retried).
STOP_MARGIN_SECONDS = 180
# Hooks a cancelled run still runs, each up to the job's hook timeout.
HOOKS_AFTER_CANCEL = ("pre-start", "post-start", "backup-abort", "job-end")


@dataclass(frozen=True)
class UnitSettings:
    """What the units need beyond the job: the command to run and its environment."""

    program: Path  # the absolute path of the guestsafe command
    config_file: Path
    uri: str
    home: str | None = None  # GUESTSAFE_HOME to pass on, if this guestsafe uses one


def find_program() -> Path:
    """The absolute path of the ``guestsafe`` command this Python runs.

    The script installed next to this interpreter comes first (a venv's
    ``bin/``), so a timer runs the same installation that wrote it.
    """
    beside = Path(sys.executable).parent / "guestsafe"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("guestsafe")
    if found is None:
        raise ConfigError("cannot find the guestsafe command to put in the timer's service")
    return Path(found).absolute()


def default_unit_dir() -> Path:
    value = os.environ.get(UNIT_DIR_ENV, "")
    return Path(value) if value else DEFAULT_UNIT_DIR


def unit_names(job_name: str) -> tuple[str, str]:
    """The timer's and the service's file names."""
    base = f"{UNIT_PREFIX}{job_name}"
    return f"{base}.timer", f"{base}.service"


def _env_arg(arg: str) -> str:
    """One quoted Environment= assignment; ``%`` specifiers escaped."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _exec_arg(arg: str) -> str:
    """One ExecStart= word: quoted, with ``$`` kept from variable expansion too."""
    return _env_arg(arg.replace("$", "$$"))


def render_units(job: Job, settings: UnitSettings) -> dict[str, str]:
    """The timer and service files for ``job``, by file name; {} for a manual job."""
    calendar = on_calendar(job)
    if calendar is None:
        return {}
    timer, service = unit_names(job.name)
    base = [str(settings.program), "--connect", settings.uri]
    base += ["--config", str(settings.config_file)]
    argv = [*base, "run", job.name, "--wait"]
    environment = ""
    if settings.home:
        environment = f"Environment={_env_arg(f'{HOME_ENV}={settings.home}')}\n"
    service_text = (
        f"{UNIT_MARKER}[Unit]\n"
        f"Description=guestsafe backup job {job.name}\n"
        # libvirt's daemons, whichever of them this host runs.
        "After=libvirtd.service virtqemud.service network-online.target local-fs.target\n"
        "\n[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(_exec_arg(a) for a in argv)}\n"
        f"{environment}"
        # A backup may take hours; the job's own timeouts bound every wait.
        "TimeoutStartSec=infinity\n"
        f"{_stop_path(job, base)}"
    )
    timer_text = (
        f"{UNIT_MARKER}[Unit]\n"
        f"Description=Schedule of guestsafe backup job {job.name}\n"
        "\n[Timer]\n"
        f"OnCalendar={calendar}\n"
        # A run missed while the host was off happens at boot.
        "Persistent=true\n"
        f"RandomizedDelaySec={job.schedule.randomized_delay}\n"
        # The default of one minute would make the shown next run approximate.
        "AccuracySec=1s\n"
        f"Unit={service}\n"
        "\n[Install]\n"
        "WantedBy=timers.target\n"
    )
    return {timer: timer_text, service: service_text}


def stop_timeout(job: Job) -> int:
    """Seconds `systemctl stop` leaves a cancelled run to start its guest again."""
    return STOP_MARGIN_SECONDS + len(HOOKS_AFTER_CANCEL) * job.hooks.timeout


def _stop_path(job: Job, base: list[str]) -> str:
    """How `systemctl stop` (or a shutdown of the host) ends a run.

    SIGTERM to guestsafe alone (``KillMode=mixed``): its handler cancels the run,
    which starts the guest again and removes the partial, as a Ctrl-C does. Hooks
    and QEMU children are not signalled meanwhile. Only after ``TimeoutStopSec``
    does systemd SIGKILL what is left, and ``ExecStopPost=guestsafe recover`` then
    finishes the clean-up that a killed run could not (it also runs after a run
    that ended by itself, where it finds nothing to do).
    """
    recover = [*base, "recover"]
    return (
        "KillMode=mixed\n"
        "KillSignal=SIGTERM\n"
        f"TimeoutStopSec={stop_timeout(job)}\n"
        f"ExecStopPost={' '.join(_exec_arg(a) for a in recover)}\n"
    )


def render_watch(settings: UnitSettings, unit_dir: Path) -> dict[str, str]:
    """The path unit and service that keep the timers in step with the jobs file."""
    argv = [str(settings.program), "--config", str(settings.config_file)]
    argv += ["schedule", "install", "--unit-dir", str(unit_dir.absolute())]
    environment = ""
    if settings.home:
        environment = f"Environment={_env_arg(f'{HOME_ENV}={settings.home}')}\n"
    path_text = (
        f"{UNIT_MARKER}[Unit]\n"
        "Description=Watch guestsafe's jobs file for schedule changes\n"
        "\n[Path]\n"
        f"PathChanged={_path_arg(settings.config_file)}\n"
        f"Unit={WATCH}.service\n"
        "\n[Install]\n"
        "WantedBy=paths.target\n"
    )
    service_text = (
        f"{UNIT_MARKER}[Unit]\n"
        "Description=Rewrite guestsafe's timers from its jobs file\n"
        "\n[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(_exec_arg(a) for a in argv)}\n"
        f"{environment}"
    )
    return {f"{WATCH}.path": path_text, f"{WATCH}.service": service_text}


def _path_arg(path: Path) -> str:
    # PathChanged= takes one unquoted path; only specifiers need escaping.
    return str(path.absolute()).replace("%", "%%")


def _own_units(unit_dir: Path) -> dict[str, Path]:
    """guestsafe's unit files in ``unit_dir``, by name: only those with the marker."""
    found: dict[str, Path] = {}
    if not unit_dir.is_dir():
        return found
    candidates = [*unit_dir.glob(f"{UNIT_PREFIX}*"), *unit_dir.glob(f"{WATCH}.*")]
    for path in sorted(candidates):
        if path.suffix in (".timer", ".service", ".path") and _has_marker(path):
            found[path.name] = path
    return found


def _has_marker(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline() == UNIT_MARKER
    except OSError:
        return False


def timers_installed(unit_dir: Path) -> bool:
    """True once ``install_timers`` has written any timer into ``unit_dir``."""
    return any(name.endswith(".timer") for name in _own_units(unit_dir))


def timers_wanted(unit_dir: Path, jobs: list[Job]) -> bool:
    """Whether saving jobs should (re)write the timers in ``unit_dir``.

    Yes once they are installed there. Yes too, for a first scheduled job, when
    root saves it on a host where systemd runs and ``unit_dir`` is systemd's own:
    a job scheduled from the console then runs with the console closed.
    """
    if timers_installed(unit_dir):
        return True
    first_time = systemd_running() and unit_dir.absolute() == DEFAULT_UNIT_DIR
    return first_time and os.geteuid() == 0 and any(j.schedule.time for j in jobs)


class TimerState(StrEnum):
    """Whether a job's timer is in ``unit_dir``; the values are what the CLI prints."""

    MANUAL = "manual"  # the job has no schedule, so no timer
    INSTALLED = "installed"
    OUTDATED = "outdated"  # installed, but differs from the job
    MISSING = "missing"


def timer_state(job: Job, unit_dir: Path, settings: UnitSettings | None = None) -> TimerState:
    """The job's timer's state; ``outdated`` is told apart only when ``settings`` is given."""
    if job.schedule.time is None:
        return TimerState.MANUAL
    timer, _service = unit_names(job.name)
    own = _own_units(unit_dir)
    if timer not in own:
        return TimerState.MISSING
    if settings is None:
        return TimerState.INSTALLED
    wanted = render_units(job, settings)
    same = all(_read(unit_dir / name) == text for name, text in wanted.items())
    return TimerState.INSTALLED if same else TimerState.OUTDATED


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


@dataclass(frozen=True)
class TimerChanges:
    written: list[str]  # unit files created or changed
    removed: list[str]  # unit files of jobs that are gone or no longer scheduled
    reloaded: bool  # whether systemd was told


def systemd_running() -> bool:
    return SYSTEMD_RUNNING.is_dir()


def install_timers(
    jobs: list[Job], settings: UnitSettings, unit_dir: Path, *, reload: bool | None = None
) -> TimerChanges:
    """Make ``unit_dir`` hold exactly the units of the scheduled ``jobs``.

    Enables each timer the way ``systemctl enable`` does (a link in
    ``timers.target.wants``), so this works without a running systemd too.
    ``reload`` defaults to: systemd runs and ``unit_dir`` is the one it reads.
    """
    wanted: dict[str, str] = {}
    for job in jobs:
        wanted |= render_units(job, settings)
    if wanted:
        wanted |= render_watch(settings, unit_dir)
    return _apply(unit_dir, wanted, _should_reload(unit_dir, reload))


def remove_timers(unit_dir: Path, *, reload: bool | None = None) -> TimerChanges:
    """Remove every guestsafe unit from ``unit_dir``."""
    return _apply(unit_dir, {}, _should_reload(unit_dir, reload))


def _should_reload(unit_dir: Path, reload: bool | None) -> bool:
    if reload is not None:
        return reload
    return systemd_running() and unit_dir.absolute() == DEFAULT_UNIT_DIR


def _apply(unit_dir: Path, wanted: dict[str, str], reload: bool) -> TimerChanges:
    own = _own_units(unit_dir)
    stale = [name for name in own if name not in wanted]
    changed = [name for name, text in wanted.items() if _read(unit_dir / name) != text]
    triggers = [n for n in changed if n.endswith((".timer", ".path"))]
    new_triggers = [n for n in triggers if n not in own]
    moved_triggers = [n for n in triggers if n in own]
    if reload:
        for trigger in (n for n in stale if n.endswith((".timer", ".path"))):
            _systemctl("stop", trigger, check=False)
    try:
        _write_units(unit_dir, wanted, changed)
        _remove_units(unit_dir, stale)
    except OSError as exc:
        raise ConfigError(
            f"cannot update timers in {unit_dir}: {exc.strerror} (run as root, or pass --unit-dir)"
        ) from exc
    if reload:
        _reload(new_triggers, moved_triggers)
    return TimerChanges(sorted(changed), sorted(stale), reload)


def _write_units(unit_dir: Path, wanted: dict[str, str], changed: list[str]) -> None:
    if wanted:
        unit_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in changed:
        # Unit files are world-readable like every other unit: they hold no secret.
        atomic_write_bytes(unit_dir / name, wanted[name].encode(), mode=0o644)
    for name in wanted:
        if Path(name).suffix in WANTS_DIRS:
            _link_wanted(unit_dir, name)


def _link_wanted(unit_dir: Path, name: str) -> None:
    # What `systemctl enable` does, so it works without a running systemd too.
    wants = unit_dir / WANTS_DIRS[Path(name).suffix]
    wants.mkdir(mode=0o755, exist_ok=True)
    link = wants / name
    target = (unit_dir / name).absolute()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _remove_units(unit_dir: Path, stale: list[str]) -> None:
    for name in stale:
        wants = WANTS_DIRS.get(Path(name).suffix)
        if wants is not None:
            (unit_dir / wants / name).unlink(missing_ok=True)
        (unit_dir / name).unlink(missing_ok=True)


def _reload(new_triggers: list[str], moved_triggers: list[str]) -> None:
    _systemctl("daemon-reload")
    for trigger in moved_triggers:
        _systemctl("stop", trigger, check=False)
        if trigger.endswith(".timer"):
            # A timer whose calendar changed would catch up on times the old
            # schedule never had (a weekday added on a Wednesday runs at once);
            # forgetting its stamp makes it wait for the next time, as run-due does.
            _systemctl("clean", "--what=state", trigger, check=False)
    for trigger in new_triggers + moved_triggers:
        _systemctl("start", trigger)


def _systemctl(*args: str, check: bool = True) -> None:
    try:
        subprocess.run(
            ["systemctl", *args],
            capture_output=True,
            timeout=60,
            check=True,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        if not check:
            return  # best effort: stopping a unit systemd never loaded, say
        raise ConfigError(
            f"systemctl {' '.join(args)} failed: {_stderr(exc)}; the unit files are written, "
            "run 'systemctl daemon-reload' and start the timers by hand"
        ) from exc


def _stderr(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
        return " ".join(exc.stderr.decode(errors="replace").split())
    return str(exc)
