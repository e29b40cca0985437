"""Locks on guests and destinations that never outlive the process holding them.

Each key (``guest:<uuid>``, ``destination:/srv/backup``) maps to one file in
``<state_dir>/locks/`` named by the SHA-256 of the key, so any key is a safe file
name. The lock is ``flock`` on that file: the kernel drops it when the holder's
last file descriptor closes, including on SIGKILL, OOM or a power cut, so there
is no stale-lock cleanup and no PID guessing.

While held, the file records who holds it (PID, host, start time, purpose) as one
JSON line, for the "busy" message and the console. Release empties it first, so
a non-empty file that is not locked is just what a killed holder left behind.

Lock files are never deleted: a process could lock a file another has just
unlinked, and two processes would then hold "the same" lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from guestsafe.engine.errors import LockBusy, PreflightError
from guestsafe.engine.paths import ensure_dir

LOCKS_DIR = "locks"
# How long a lock that carries no holder record may stay so before it counts as
# busy: another process may have just locked it and not yet written its record,
# or `holder()` may be probing it.
_SETTLE_SECONDS = 0.2
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class LockHolder:
    key: str
    pid: int
    host: str
    since: datetime  # timezone-aware
    purpose: str

    def describe(self) -> str:
        since = self.since.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        return f"PID {self.pid} on {self.host} since {since} ({self.purpose})"


def guest_key(guest: str) -> str:
    """The lock key of a guest; pass its UUID when known, as names can be reused."""
    return f"guest:{guest}"


def destination_key(destination: Path) -> str:
    """The lock key of a destination; two spellings of one directory share it."""
    return f"destination:{os.path.realpath(destination)}"


def lock_path(state_dir: Path, key: str) -> Path:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return state_dir / LOCKS_DIR / f"{digest}.lock"


class Lock:
    """An exclusive lock on ``key``; a context manager that acquires on entry.

    Locks are per open file, so a second ``Lock`` on the same key in the same
    process is refused as if it came from another process.
    """

    def __init__(self, state_dir: Path, key: str, purpose: str) -> None:
        self.state_dir = state_dir
        self.key = key
        # One line, so the busy message stays one line.
        self.purpose = " ".join(purpose.split())
        self.path = lock_path(state_dir, key)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: float = 0.0) -> Lock:
        """Take the lock, waiting up to ``wait`` seconds; ``LockBusy`` if it stays taken."""
        if self._fd is not None:
            return self
        ensure_dir(self.path.parent)
        # O_CLOEXEC: a hook or qemu-img started while we hold the lock must not
        # inherit it and keep it after we exit.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise PreflightError(f"cannot open lock file {self.path}: {exc.strerror}") from exc
        try:
            self._wait_for(fd, wait)
            self._record(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten lock is released when the object goes, like a file.
        if getattr(self, "_fd", None) is not None:
            self.release()

    def _wait_for(self, fd: int, wait: float) -> None:
        start = time.monotonic()
        while not _try_flock(fd, fcntl.LOCK_EX):
            waited = time.monotonic() - start
            current = _read_holder(fd)
            if waited >= max(wait, 0.0) and (current is not None or waited >= _SETTLE_SECONDS):
                raise LockBusy(_busy_message(self.key, current))
            time.sleep(_POLL_SECONDS)

    def _record(self, fd: int) -> None:
        record = {
            "key": self.key,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
            "purpose": self.purpose,
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def acquire(state_dir: Path, key: str, purpose: str, *, wait: float = 0.0) -> Lock:
    """Take the lock on ``key`` for ``purpose`` ("backup of job nightly").

    ``wait=0`` fails at once with ``LockBusy`` naming the holder; a positive
    ``wait`` polls until then. Use the result as a context manager to release.
    """
    return Lock(state_dir, key, purpose).acquire(wait=wait)


def holder(state_dir: Path, key: str) -> LockHolder | None:
    """Who holds the lock on ``key`` now, or None if nobody does."""
    try:
        fd = os.open(lock_path(state_dir, key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        record = _read_holder(fd)
        # An empty record means free (or just taken); a record on an unlocked
        # file is what a killed holder left. Probing only in the second case keeps
        # this from briefly blocking a process that wants the lock.
        if record is None or _try_flock(fd, fcntl.LOCK_SH):
            return None
        return record
    finally:
        os.close(fd)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> LockHolder | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return LockHolder(
            key=str(record["key"]),
            pid=int(record["pid"]),
            host=str(record["host"]),
            since=datetime.fromisoformat(record["since"]),
            purpose=str(record["purpose"]),
        )
    except (ValueError, KeyError, TypeError):
        # Empty, or caught half-written by its holder.
        return None


def _busy_message(key: str, current: LockHolder | None) -> str:
    if current is None:
        return f"busy: {key} is locked by another guestsafe process; try again shortly"
    return f"busy: {key} held by {current.describe()}"
