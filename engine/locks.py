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

An archive has one more lock, kept in the archive itself (``archive_lock``):
``<root>/.guestsafe-lock``. A state-folder lock only keeps out processes of this
host that spell the path the same way; the one in the archive also holds against
another host on the same NFS share and against this host reaching the archive
through another path (a bind mount, a symlinked parent). It is a POSIX record
lock owned by the open file (``F_OFD_SETLK``): NFSv4 carries those to the server,
where ``flock`` may stay local, and unlike ``lockf`` closing another descriptor
of the file does not drop it. The server drops it when the holder dies (at once,
or when the client's lease expires).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from guestsafe.engine.errors import LockBusy, PreflightError
from guestsafe.engine.paths import ensure_dir

LOCKS_DIR = "locks"
ARCHIVE_LOCK_FILE = ".guestsafe-lock"
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
    started: int | None = None  # the holder's start in ticks since boot: tells a reused PID

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

    def __init__(
        self, state_dir: Path, key: str, purpose: str, *, path: Path | None = None
    ) -> None:
        self.state_dir = state_dir
        self.key = key
        # One line, so the busy message stays one line.
        self.purpose = " ".join(purpose.split())
        # A lock at a given path (the archive's) is a record lock, one in the state
        # folder an flock.
        self.record_lock = path is not None
        self.path = path if path is not None else lock_path(state_dir, key)
        self._fd: int | None = None
        # The record the last holder left, read before ours replaces it.
        self.previous: LockHolder | None = None

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
            self.previous = _read_holder(fd)
            self._record(fd)
        except OSError as exc:
            os.close(fd)
            # ENOLCK: an NFSv3 share without its lock daemon (rpc.statd).
            raise PreflightError(
                f"cannot lock {self.path}: {exc.strerror}; guestsafe needs working file "
                "locks there (on NFS: run rpc.statd, or use NFSv4)"
            ) from exc
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
        while not _try_lock(fd, exclusive=True, record=self.record_lock):
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
            "started": process_start(os.getpid()),
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
    return _holder_at(lock_path(state_dir, key), record=False)


def archive_lock(root: Path, purpose: str) -> Lock:
    """The lock on the archive at ``root``, kept in the archive (see the module's notes)."""
    return Lock(root, f"archive {root}", purpose, path=root / ARCHIVE_LOCK_FILE)


def archive_holder(root: Path) -> LockHolder | None:
    """Who holds the archive at ``root`` now, or None if nobody does."""
    return _holder_at(root / ARCHIVE_LOCK_FILE, record=True)


def holder_alive(record: LockHolder) -> bool | None:
    """Whether the process a record names still runs; None if it ran on another host."""
    if record.host != socket.gethostname():
        return None
    started = process_start(record.pid)
    if started is None:
        return False
    # A PID handed out again belongs to a process started later.
    return record.started is None or record.started == started


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; count from its end.
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_start_stamp(pid: int) -> str | None:
    """``process_start`` as the journals record it, so a recycled PID is not taken for
    the process that wrote an entry."""
    started = process_start(pid)
    return None if started is None else str(started)


def _holder_at(path: Path, *, record: bool) -> LockHolder | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        found = _read_holder(fd)
        # An empty record means free (or just taken); a record on an unlocked
        # file is what a killed holder left. Probing only in the second case keeps
        # this from briefly blocking a process that wants the lock.
        if found is None or _try_lock(fd, exclusive=False, record=record):
            return None
        return found
    finally:
        os.close(fd)


def _try_lock(fd: int, *, exclusive: bool, record: bool) -> bool:
    """One attempt at the lock; a probe's shared lock goes with its descriptor."""
    try:
        if record:
            kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
            # struct flock, whole file; l_pid must be 0 for an open-file lock.
            request = struct.pack("@hhqqixxxx", kind, os.SEEK_SET, 0, 0, 0)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        else:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False  # EAGAIN, or EACCES as some filesystems say it for record locks
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
            started=_int_or_none(record.get("started")),
        )
    except (ValueError, KeyError, TypeError):
        # Empty, or caught half-written by its holder.
        return None


def _int_or_none(value: object) -> int | None:
    return value if type(value) is int else None


def _busy_message(key: str, current: LockHolder | None) -> str:
    if current is None:
        return f"busy: {key} is locked by another guestsafe process; try again shortly"
    return f"busy: {key} held by {current.describe()}"
