"""What every guest of one run shares: the job, the connection, the journal, the locks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.hooks import HookRunner
from guestsafe.engine.backup.journal import Journal
from guestsafe.engine.errors import Cancelled, LockBusy
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.paths import Paths


@dataclass
class JobContext:
    job: Job
    hv: Hypervisor
    paths: Paths
    report: Reporter
    journal: Journal
    cancel: threading.Event
    archive: Archive | None = None
    # Closed when the job ends, whatever happened: unmounts the job's device.
    cleanup: ExitStack = field(default_factory=ExitStack)
    hooks: HookRunner | None = None
    # A person is waiting for the answer (the console, `guestsafe run`): a busy
    # guest or destination is reported at once, not waited for (README).
    interactive: bool = False


def take_lock(ctx: JobContext, key: str, what: str) -> locks.Lock:
    """The lock on ``key``, waiting up to the job's ``lock_wait`` for its holder.

    An interactive run does not wait: it says at once who holds the lock.
    Waits in short steps so a cancel is seen; never runs alongside the holder.
    """
    state_dir = ctx.paths.state_dir

    def attempt(wait: float) -> locks.Lock:
        return locks.acquire(state_dir, key, _purpose(ctx), wait=wait)

    return _wait_for(ctx, what, attempt, lambda: locks.holder(state_dir, key))


def take_archive_lock(ctx: JobContext, root: Path) -> locks.Lock:
    """The lock kept in the archive at ``root``, with the same waiting as ``take_lock``."""

    def attempt(wait: float) -> locks.Lock:
        return locks.archive_lock(root, _purpose(ctx)).acquire(wait=wait)

    return _wait_for(ctx, f"archive {root}", attempt, lambda: locks.archive_holder(root))


def _purpose(ctx: JobContext) -> str:
    return f"backup of job {ctx.job.name}"


def _wait_for(
    ctx: JobContext,
    what: str,
    attempt: Callable[[float], locks.Lock],
    holder: Callable[[], locks.LockHolder | None],
) -> locks.Lock:
    try:
        return attempt(0.0)
    except LockBusy as exc:
        if ctx.interactive or ctx.job.lock_wait <= 0:
            raise _busy(ctx, what, holder()) from exc
    events.info(
        ctx.report, f"{what} is busy ({_held_by(holder())}); waiting up to {ctx.job.lock_wait} s"
    )
    deadline = time.monotonic() + ctx.job.lock_wait
    while True:
        remaining = deadline - time.monotonic()
        try:
            return attempt(max(0.0, min(1.0, remaining)))
        except LockBusy as exc:
            if ctx.cancel.is_set():
                raise Cancelled(f"cancelled while waiting for {what}") from exc
            if remaining <= 1.0:
                raise _busy(ctx, what, holder()) from exc


def _held_by(current: locks.LockHolder | None) -> str:
    return f"held by {current.describe()}" if current is not None else "locked by another process"


def _busy(ctx: JobContext, what: str, current: locks.LockHolder | None) -> LockBusy:
    if ctx.interactive:
        waited = (
            f"; try again once it is free ('guestsafe run --wait' waits up to "
            f"{ctx.job.lock_wait} s)"
        )
    elif ctx.job.lock_wait > 0:
        waited = f"; gave up after {ctx.job.lock_wait} s"
    else:
        waited = ""
    return LockBusy(f"busy: {what} {_held_by(current)}{waited}")
