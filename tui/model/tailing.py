"""Reading a growing log file line by line, from any thread.

The reader keeps its offset and any unfinished last line, so a line being
written is never shown in halves, and a truncated or replaced file is read
again from its start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

# A past run's log can be long; the view keeps only its last lines anyway.
INITIAL_TAIL_BYTES = 512 * 1024
READ_CHUNK = 256 * 1024


class LogFollower:
    def __init__(self, path: Path, *, tail_bytes: int = INITIAL_TAIL_BYTES) -> None:
        self.path = path
        self._tail_bytes = tail_bytes
        self._offset: int | None = None
        self._inode: int | None = None
        self._partial = b""
        self._skip_fragment = False

    def read_new(self) -> list[str]:
        """Complete lines added since the last call; [] while the file is missing."""
        try:
            with self.path.open("rb") as f:
                offset = self._seek(f)
                data = f.read(READ_CHUNK)
        except FileNotFoundError:
            return []
        self._offset = offset + len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if self._skip_fragment and lines:
            # Reading began mid-file, so the first "line" is the end of one.
            lines.pop(0)
            self._skip_fragment = False
        return [line.decode("utf-8", errors="replace") for line in lines]

    def _seek(self, f: BinaryIO) -> int:
        stat = os.fstat(f.fileno())
        if self._offset is None:
            self._inode = stat.st_ino
            self._offset = max(0, stat.st_size - self._tail_bytes)
            self._skip_fragment = self._offset > 0
        elif stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode = stat.st_ino
            self._offset = 0
            self._partial = b""
            self._skip_fragment = False
        f.seek(self._offset)
        return self._offset
