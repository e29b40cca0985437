"""Operator hooks: programs a job runs at fixed points of a backup.

Phases, in the order a guest meets them::

    job-start                      once, before any guest; failing vetoes the whole job
      pre-stop                     before guestsafe shuts the guest down (freeze);
                                   failing vetoes this guest's backup, the guest untouched
      post-stop                    the guest is off
      pre-start                    the copy is done, the guest is about to start
      post-start                   the guest runs again (thaw)
      backup-end | backup-abort    the guest's backup is over: backup-end when it went
                                   well, backup-abort when it failed at or after pre-stop
                                   (a failing pre-stop included, so a half-done freeze can
                                   be undone); the guest is back in its power state
    job-end                        once, after every guest, whenever job-start ran

pre-stop, post-stop, pre-start and post-start run only around a shutdown and
start guestsafe performs; a guest that was shut off is neither stopped nor
started. A failure after pre-stop is logged and marks the run failed, but never
keeps a guest from being started again.

A hook is an argument list run without a shell, from ``/``, with stdin from
``/dev/null``, in a session of its own so that a timeout (``Hooks.timeout``)
or a cancel kills it and everything it started. It inherits guestsafe's
environment plus ``GUESTSAFE_JOB``, ``GUESTSAFE_GUEST`` (empty for job-level
phases), ``GUESTSAFE_GUESTS`` (all of the job's guests, one per line),
``GUESTSAFE_PHASE``, ``GUESTSAFE_MODE``, ``GUESTSAFE_VERSION_PATH`` (the
version folder being written, then the committed one; empty before the copy),
``GUESTSAFE_STATUS`` (``ok`` or ``failed`` so far) and ``GUESTSAFE_ERROR`` (the
first error, if any). Its standard output and error go to the run's log, at
most ``OUTPUT_LIMIT`` bytes of them.

Hooks run as root, so the program, and every directory above it, must belong
to root (or to the user running guestsafe) and not be writable by group or
others; a world-writable directory with the sticky bit, like ``/tmp``, is
accepted. A job whose hook fails this check does not run at all.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine import events
from guestsafe.engine.errors import HookFailed
from guestsafe.engine.events import Reporter
from guestsafe.engine.jobs.model import HOOK_PHASES, Hooks, Job

VETO_PHASES = ("job-start", "pre-stop")
OUTPUT_LIMIT = 64 * 1024
ENV_PREFIX = "GUESTSAFE_"
_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a hook that overstays
_DRAIN = 1.0  # seconds to read what a finished hook's children still write
_POLL = 0.1


# --- who may be run ------------------------------------------------------------


def program_problem(program: str) -> str | None:
    """Why ``program`` may not run as a hook, or None if it may."""
    path = Path(program)
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{program} does not exist"
    except OSError as exc:
        return f"{program}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{program} is not a regular file"
    if not st.st_mode & 0o111:
        return f"{program} is not executable (chmod 755 {program})"
    problem = _unsafe(path, st, "")
    if problem is not None:
        return problem
    for directory in _directories(path):
        try:
            dst = directory.stat()
        except OSError as exc:
            return f"directory {directory} of {program}: {exc.strerror}"
        problem = _unsafe(directory, dst, f" (it holds {program}, which anyone could swap)")
        if problem is not None:
            return problem
    return None


def _directories(path: Path) -> list[Path]:
    """Every directory above ``path`` as written and above the file it resolves to."""
    seen: dict[Path, None] = {}
    for start in (path.absolute(), Path(os.path.realpath(path))):
        for directory in start.parents:
            seen.setdefault(directory, None)
    return list(seen)


def _unsafe(path: Path, st: os.stat_result, why: str) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to uid {st.st_uid}, not root{why}; chown root {path}"
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not sticky_dir:
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is writable by group or others (mode {mode:04o}){why}; chmod go-w {path}"
    return None


def check_programs(hooks: Hooks) -> list[tuple[str, str]]:
    """(phase, message) for every hook whose program may not run."""
    problems = []
    for phase in HOOK_PHASES:
        argv = hooks.commands.get(phase)
        if argv:
            problem = program_problem(argv[0])
            if problem is not None:
                problems.append((phase, f"hooks.{phase}: {problem}"))
    return problems


# --- running one ---------------------------------------------------------------


@dataclass(frozen=True)
class HookResult:
    phase: str
    program: str
    returncode: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    start_error: str | None = None
    seconds: float = 0.0
    limit: float = 0.0  # the timeout it had

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.cancelled or self.start_error)

    def describe(self) -> str:
        """How it ended: "exited with status 1", "timed out after 300 s", ..."""
        if self.start_error is not None:
            return f"could not start: {self.start_error}"
        if self.cancelled:
            return "was stopped: the run was cancelled"
        if self.timed_out:
            return f"timed out after {self.limit:g} s and was killed"
        if self.returncode is not None and self.returncode < 0:
            return f"was killed by signal {-self.returncode}"
        return f"exited with status {self.returncode}"


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the backup, as environment variables."""

    job: str
    mode: str
    guests: tuple[str, ...]
    guest: str = ""
    version_path: str = ""
    status: str = "ok"
    error: str = ""

    def environment(self, phase: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        # GUESTSAFE_HOME says where this guestsafe keeps its files; a hook may use it.
        if "GUESTSAFE_HOME" in os.environ:
            env["GUESTSAFE_HOME"] = os.environ["GUESTSAFE_HOME"]
        return env | {
            "GUESTSAFE_JOB": self.job,
            "GUESTSAFE_GUEST": self.guest,
            "GUESTSAFE_GUESTS": "\n".join(self.guests),
            "GUESTSAFE_PHASE": phase,
            "GUESTSAFE_MODE": self.mode,
            "GUESTSAFE_VERSION_PATH": self.version_path,
            "GUESTSAFE_STATUS": self.status,
            "GUESTSAFE_ERROR": self.error,
        }


class _Output:
    """The first OUTPUT_LIMIT bytes a hook writes, and how many more there were."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def lines(self) -> list[str]:
        text = self.kept.decode("utf-8", errors="replace")
        return [line for line in text.splitlines() if line.strip()]


def run_hook(
    phase: str,
    argv: list[str],
    env: dict[str, str],
    timeout: float,
    *,
    cancel: threading.Event | None = None,
) -> tuple[HookResult, _Output]:
    """Run one hook to its end, its timeout or a cancel; never raises for its failure."""
    t0 = time.monotonic()
    output = _Output()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(phase, argv[0], start_error=exc.strerror or str(exc)), output
    assert proc.stdout is not None
    with proc.stdout:
        ended = _collect(proc, proc.stdout.fileno(), output, t0 + timeout, cancel)
    if ended != "done":
        _kill(proc)
    seconds = time.monotonic() - t0
    result = HookResult(
        phase,
        argv[0],
        returncode=proc.returncode,
        timed_out=ended == "timeout",
        cancelled=ended == "cancel",
        seconds=seconds,
        limit=timeout,
    )
    return result, output


def _collect(
    proc: subprocess.Popen[bytes],
    fd: int,
    output: _Output,
    deadline: float,
    cancel: threading.Event | None,
) -> str:
    """Read the hook's output until it exits: "done", "timeout" or "cancel"."""
    eof = False
    exited_at: float | None = None
    while True:
        now = time.monotonic()
        if cancel is not None and cancel.is_set():
            return "cancel"
        if now >= deadline:
            return "timeout"
        if proc.poll() is not None:
            exited_at = exited_at or now
            # A child the hook left behind may hold the pipe open for ever.
            if eof or now - exited_at >= _DRAIN:
                return "done"
        if eof:
            time.sleep(min(_POLL, deadline - now))
            continue
        ready, _, _ = select.select([fd], [], [], min(_POLL, deadline - now))
        if ready:
            chunk = os.read(fd, 65536)
            if chunk:
                output.add(chunk)
            else:
                eof = True


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the hook's session, SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the runner's side -----------------------------------------------------------


class HookRunner:
    """Runs a job's hooks, logs them, and turns failures into ``HookFailed``."""

    def __init__(self, job: Job, report: Reporter, cancel: threading.Event | None = None) -> None:
        self.job = job
        self.report = report
        self.cancel = cancel

    def check(self) -> None:
        """Refuse the job if any hook program is unsafe or missing."""
        problems = check_programs(self.job.hooks)
        if problems:
            first = problems[0][1]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise HookFailed(f"job {self.job.name} refused: {first}{more}")

    def run(
        self,
        phase: str,
        *,
        guest: str = "",
        version_path: Path | None = None,
        status: str = "ok",
        error: str = "",
    ) -> HookFailed | None:
        """Run ``phase``'s hook if the job has one; the failure, if it failed."""
        argv = self.job.hooks.commands.get(phase)
        if not argv:
            return None
        context = HookContext(
            job=self.job.name,
            mode=self.job.mode,
            guests=tuple(self.job.guests),
            guest=guest,
            version_path=str(version_path) if version_path is not None else "",
            status=status,
            error=error,
        )
        who = guest or None
        events.info(self.report, f"hook {phase}: running {' '.join(argv)}", who)
        result, output = run_hook(
            phase, argv, context.environment(phase), self.job.hooks.timeout, cancel=self.cancel
        )
        self._log_output(phase, output, who)
        if result.ok:
            events.info(self.report, f"hook {phase}: done in {result.seconds:.1f} s", who)
            return None
        message = f"hook {phase} ({argv[0]}) {result.describe()}"
        events.error(self.report, message, who)
        return HookFailed(message)

    def veto(self, phase: str, *, guest: str = "", status: str = "ok") -> None:
        """Run a job-start or pre-stop hook; raise if it says no."""
        failure = self.run(phase, guest=guest, status=status)
        if failure is not None:
            before = "no guest was stopped" if phase == "job-start" else "the guest was not stopped"
            raise HookFailed(f"backup vetoed: {failure.message}; {before}")

    def _log_output(self, phase: str, output: _Output, guest: str | None) -> None:
        for line in output.lines():
            events.info(self.report, f"hook {phase}: {line}", guest)
        if output.dropped:
            events.warn(
                self.report,
                f"hook {phase}: {output.dropped} more bytes of output not logged",
                guest,
            )
