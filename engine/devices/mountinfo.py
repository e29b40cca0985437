"""The mount table (``/proc/self/mountinfo``) and active swap: what is in use.

A device is in use when it is mounted, is active swap, or backs either: the
mount entry's own device, and the block device a mounted loop or device-mapper
device sits on (``MountEntry.source_devnum``).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.errors import DeviceError

MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    devnum: int  # st_dev of the filesystem (anonymous for btrfs)
    root: str
    target: str
    options: frozenset[str]  # per-mount flags: nosuid, nodev, noexec, ro ...
    fstype: str
    source: str
    shared: bool = False  # in a peer group: mounts and unmounts below it propagate
    parent_id: int = 0

    @property
    def source_devnum(self) -> int | None:
        """The block device named as the source, when it is one."""
        if not self.source.startswith("/dev/"):
            return None
        try:
            st = os.stat(self.source)
        except OSError:
            return None
        return st.st_rdev if stat.S_ISBLK(st.st_mode) else None

    def is_of(self, devnum: int) -> bool:
        return devnum in (self.devnum, self.source_devnum)


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """The entries of a mountinfo text, in mount order (the top of a stack last)."""
    entries = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = (int(x) for x in fields[2].split(b":"))
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    devnum=os.makedev(major, minor),
                    root=_unescape(fields[3]),
                    target=_unescape(fields[4]),
                    options=frozenset(_unescape(fields[5]).split(",")),
                    fstype=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    shared=any(f.startswith(b"shared:") for f in fields[6:sep]),
                    parent_id=int(fields[1]),
                )
            )
        except (ValueError, IndexError):
            continue  # a line we cannot read names nothing we could use
    return entries


def read_mounts() -> list[MountEntry]:
    return parse_mountinfo(MOUNTINFO.read_bytes())


def mounts_of(devnum: int, entries: Iterable[MountEntry] | None = None) -> list[MountEntry]:
    """Where the block device ``devnum`` is mounted."""
    return [e for e in (read_mounts() if entries is None else entries) if e.is_of(devnum)]


def mount_at(target: str | Path, entries: Iterable[MountEntry] | None = None) -> MountEntry | None:
    """The mount on top at ``target`` (a real path), or None if it is no mount point."""
    found = None
    for entry in read_mounts() if entries is None else entries:
        if entry.target == str(target):
            found = entry
    return found


def mount_containing(path: str | Path, entries: Iterable[MountEntry] | None = None) -> MountEntry:
    """The mount that ``path`` (a real path) lies on, the top one where several are."""
    best: MountEntry | None = None
    for entry in read_mounts() if entries is None else entries:
        inside = str(path) == entry.target or str(path).startswith(entry.target.rstrip("/") + "/")
        if inside and (best is None or len(entry.target) >= len(best.target)):
            best = entry
    if best is None:
        raise DeviceError(f"no mount holds {path}; is /proc mounted?")
    return best


def is_self_bind(entry: MountEntry, entries: Iterable[MountEntry]) -> bool:
    """Whether ``entry`` is a directory bound onto itself (a mount point made shared)."""
    parent = next((e for e in entries if e.mount_id == entry.parent_id), None)
    if parent is None or (parent.devnum, parent.source) != (entry.devnum, entry.source):
        return False
    inside = os.path.relpath(entry.target, parent.target)
    return os.path.normpath(os.path.join(parent.root, inside)) == entry.root


def _active_swap_devnums() -> set[int]:
    found: set[int] = set()
    try:
        lines = SWAPS.read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        name = line.split()[0].replace("\\040", " ") if line.split() else ""
        with contextlib.suppress(OSError):
            st = os.stat(name)
            # A swap partition is itself busy; a swap file keeps its filesystem busy.
            found.add(st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev)
    return found


def in_use_devnums(entries: Iterable[MountEntry], *, ignore_below: str | None = None) -> set[int]:
    """Block devices that are mounted (except below ``ignore_below``) or active swap."""
    found: set[int] = set()
    for entry in entries:
        if ignore_below and entry.target.startswith(ignore_below.rstrip("/") + "/"):
            continue
        if os.major(entry.devnum) != 0:
            found.add(entry.devnum)
        source = entry.source_devnum
        if source is not None:
            found.add(source)
    return found | _active_swap_devnums()
