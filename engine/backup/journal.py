"""The crash journal: what a runner was doing, so the next command can undo it.

Before each phase of a guest's backup the runner rewrites one small JSON file
in ``<state_dir>/journal/``. If the process dies (SIGKILL, OOM, power cut of
the SSH session), the file stays behind. ``recover()``, which every guestsafe
command runs first, finds entries whose process is gone, starts the guests the
engine had stopped, and removes their partial versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guestsafe.engine import locks
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.fsutil import atomic_write_bytes

JOURNAL_DIR = "journal"


@dataclass
class JournalEntry:
    job: str
    guest: str
    guest_uuid: str
    uri: str
    was_state: str
    phase: str = Phase.PREFLIGHT  # a Phase's spelling; read back as a plain str
    partial: str | None = None
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: locks.process_start_stamp(os.getpid()))
    host: str = field(default_factory=socket.gethostname)
    entry_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # What recovery needs to tell "guestsafe stopped it and nothing touched it
    # since" (recovery.py's docstring has the rule). Times are wall-clock epochs.
    config_digest: str | None = None  # of the inactive domain XML at preflight
    shutdown_requested: float | None = None  # the clean shutdown was asked for
    shutdown_deadline: float | None = None  # ... and the job's timeout ends then
    settle_by: float | None = None  # a running guest may still power off until then
    off_at: float | None = None  # guestsafe saw the guest off
    disks_mtime_ns: int | None = None  # the newest disk file's mtime, seen off
    # A transient guest's domain XML, read before the shutdown: once off it is gone
    # from libvirt, and recovery creates it again from this.
    transient_xml: str | None = None
    told: bool = False  # the operator was told why recovery left it alone
    detached: bool = False  # the runner is done with it (its lock released)

    def owner_alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # not ours to judge
        return locks.process_start_stamp(self.pid) == self.pid_start

    def recoverable(self) -> bool:
        """Whether recovery may act on it: its runner is gone, or done with it."""
        if self.host != socket.gethostname():
            return False
        return self.detached or not self.owner_alive()


def config_digest(xml: str) -> str:
    """A digest of a domain definition, to notice that it was redefined."""
    return hashlib.sha256(xml.encode()).hexdigest()


def newest_mtime_ns(paths: list[str]) -> int | None:
    """The newest mtime of ``paths`` (a guest's disk files), None if none can be read."""
    found = []
    for path in paths:
        try:
            found.append(os.stat(path).st_mtime_ns)
        except OSError:
            continue
    return max(found) if found else None


class Journal:
    """The journal files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / JOURNAL_DIR

    def _path(self, entry: JournalEntry) -> Path:
        return self.dir / f"{entry.entry_id}.json"

    def write(self, entry: JournalEntry) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(asdict(entry), indent=1).encode()
        atomic_write_bytes(self._path(entry), data, mode=0o600)

    def phase(self, entry: JournalEntry, phase: Phase, partial: Path | None = None) -> None:
        entry.phase = str(phase)
        if partial is not None:
            entry.partial = str(partial)
        self.write(entry)

    def remove(self, entry: JournalEntry) -> None:
        self._path(entry).unlink(missing_ok=True)

    def entries(self) -> list[JournalEntry]:
        if not self.dir.is_dir():
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(JournalEntry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a torn write of the temp file never lands here; skip junk
        return found

    def orphans(self) -> list[JournalEntry]:
        return [e for e in self.entries() if e.recoverable()]


def remove_partial(partial: str | None, log: Callable[[str], None]) -> None:
    """Remove a ``.partial-N`` folder left by a dead runner, and nothing else."""
    if not partial:
        return
    path = Path(partial)
    if not path.name.startswith(".partial-") or path.is_symlink():
        log(f"journal names {path}, which is not a partial version: left alone")
        return
    if path.exists():
        shutil.rmtree(path)
        log(f"removed unfinished backup {path}")
    _finish_deletions(path.parent, log)


def _finish_deletions(guest_dir: Path, log: Callable[[str], None]) -> None:
    """Finish a retention the dead runner began: its versions were already unlisted."""
    if guest_dir.is_symlink() or not guest_dir.is_dir():
        return
    for doomed in sorted(guest_dir.glob(".deleting-*")):
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed)
            log(f"finished deleting {doomed}")
