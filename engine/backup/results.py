"""A run's result, and each job's last run, kept for the Jobs tab and ``guestsafe jobs``.

One small JSON file per job in ``<state>/results``, replaced atomically after
every run: whether it went well, when it ended, its log, and one line per guest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine.errors import (
    ArchiveError,
    Cancelled,
    CopyError,
    DeviceError,
    HypervisorError,
    NotFoundError,
    PreflightError,
    RunFailed,
)
from guestsafe.engine.events import GuestOutcome
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.paths import ensure_dir

RESULTS_DIR = "results"

# The exit code of a failed run is its most specific cause; when guests failed for
# different causes, the first of these that any of them has (README, "Exit codes"):
# an interrupted run, then a device error, a refusal before anything stopped, a
# failed copy, the hypervisor, a guest not found, the archive. Anything else,
# hooks included, is 11.
EXIT_PRIORITY = (
    Cancelled.exit_code,
    DeviceError.exit_code,
    PreflightError.exit_code,
    CopyError.exit_code,
    HypervisorError.exit_code,
    NotFoundError.exit_code,
    ArchiveError.exit_code,
)


@dataclass
class RunResult:
    job: str
    log_path: Path
    outcomes: list[GuestOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # job-level, e.g. a failed job-end hook
    causes: dict[str, int] = field(default_factory=dict)  # failed guest: its error's exit code
    # When the run began (ISO, UTC): made with the result, at the run's start.
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # The restore tests after the run that did not pass (failed, or could not run),
    # one line each; set by Engine.run_job. The backups may still all be ok.
    restore_tests_failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes) and not self.problems

    @property
    def exit_code(self) -> int:
        """0, or the most specific cause of the failure by ``EXIT_PRIORITY``."""
        if self.ok:
            return 0
        found = set(self.causes.values())
        return next((code for code in EXIT_PRIORITY if code in found), RunFailed.exit_code)

    def raise_for_failure(self) -> None:
        if not self.ok:
            failed = ", ".join(o.guest for o in self.outcomes if not o.ok)
            what = f"backup failed for {failed}" if failed else "; ".join(self.problems)
            error = RunFailed(f"job {self.job}: {what} (log: {self.log_path})")
            error.exit_code = self.exit_code
            if error.exit_code == Cancelled.exit_code:
                error.title = Cancelled.title
            raise error


@dataclass(frozen=True)
class LastResult:
    job: str
    ok: bool
    finished: str  # ISO time, UTC
    log_path: str
    summary: list[str]  # "guest: message" per guest, then the job's own problems
    started: str = ""  # ISO time, UTC; "" in results kept before it was recorded

    @property
    def seconds(self) -> float | None:
        """How long the run took, or None when its start is not known."""
        try:
            began = datetime.fromisoformat(self.started)
            ended = datetime.fromisoformat(self.finished)
        except ValueError:
            return None
        return (ended - began).total_seconds()


def save(state_dir: Path, result: RunResult) -> LastResult:
    """Keep ``result`` as its job's last run, in place of the one before."""
    directory = state_dir / RESULTS_DIR
    ensure_dir(directory)
    last = LastResult(
        result.job,
        result.ok,
        datetime.now(UTC).isoformat(timespec="seconds"),
        str(result.log_path),
        [f"{o.guest}: {o.message}" for o in result.outcomes] + result.problems,
        result.started,
    )
    atomic_write_bytes(directory / f"{result.job}.json", json.dumps(asdict(last)).encode())
    return last


def load(state_dir: Path) -> dict[str, LastResult]:
    """Every job's last run, by job name; files that do not read are left out."""
    directory = state_dir / RESULTS_DIR
    found: dict[str, LastResult] = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            last = LastResult(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        found[last.job] = last
    return found
