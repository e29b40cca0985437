"""The restore journal: what a restore over the original was doing, so a crash can be undone.

A restore over the original writes each restored file beside the one it
replaces, under a temporary name, and swaps them only once every copy is
complete and fsynced. Before each step it rewrites one small JSON file in
``<state_dir>/restore-journal/`` (its own folder: restore never shares the
backup's journal). ``recover_restores`` reads the entries whose process is gone.

Phases, in order:

- ``copy``: temporary copies are being written; the originals are untouched,
  except a block device marked ``writing``: it is overwritten in place once every
  file copy is complete and the version's file for it has been checked, and is
  incomplete if the process died then (recovery reports it).
- ``swap``: every copy is complete; each original is linked to its
  ``.replaced-`` name and the copy renamed over it.
- ``define``: every file is swapped; the version's domain XML is being defined.
- ``cleanup``: the restore succeeded; replaced files not kept are being deleted.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from guestsafe.engine import locks
from guestsafe.engine.fsutil import atomic_write_bytes, fsync_dir
from guestsafe.engine.paths import ensure_dir

RESTORE_JOURNAL_DIR = "restore-journal"


class SwapPhase(StrEnum):
    COPY = "copy"
    SWAP = "swap"
    DEFINE = "define"
    CLEANUP = "cleanup"


@dataclass
class FileSwap:
    """One file restored over the original: where it goes, its copy, the replaced one."""

    path: str
    temp: str
    replaced: str
    had_original: bool
    # A block device: written in place (it cannot be renamed), so it has no copy
    # and no replaced name; ``writing`` is set once its first byte may be written.
    in_place: bool = False
    writing: bool = False


@dataclass
class RestoreEntry:
    guest: str
    guest_uuid: str
    uri: str
    number: int
    files: list[FileSwap]
    new_xml: str
    keep_replaced: bool
    phase: str = SwapPhase.COPY
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: locks.process_start_stamp(os.getpid()))
    host: str = field(default_factory=socket.gethostname)
    entry_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def owner_alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # not ours to judge
        return locks.process_start_stamp(self.pid) == self.pid_start

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestoreEntry:
        files = [FileSwap(**f) for f in data.pop("files")]
        return cls(files=files, **data)


class RestoreJournal:
    """The restore journal files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / RESTORE_JOURNAL_DIR

    def _path(self, entry: RestoreEntry) -> Path:
        return self.dir / f"{entry.entry_id}.json"

    def write(self, entry: RestoreEntry) -> None:
        ensure_dir(self.dir)
        # The XML may hold console passwords: 0600, like the backup's journal.
        atomic_write_bytes(self._path(entry), json.dumps(asdict(entry), indent=1).encode())

    def phase(self, entry: RestoreEntry, phase: SwapPhase) -> None:
        entry.phase = str(phase)
        self.write(entry)

    def remove(self, entry: RestoreEntry) -> None:
        self._path(entry).unlink(missing_ok=True)
        if self.dir.is_dir():
            fsync_dir(self.dir)

    def entries(self) -> list[RestoreEntry]:
        if not self.dir.is_dir():
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(RestoreEntry.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a torn write of the temp file never lands here; skip junk
        return found

    def orphans(self) -> list[RestoreEntry]:
        return [e for e in self.entries() if not e.owner_alive()]
