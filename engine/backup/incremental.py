"""Whether a push backup may read only what changed since the previous version.

The rule is one-sided: any doubt about the checkpoint chain means a full read.
An incremental version is a reflink clone of the previous version's qcow2 file
with the changed clusters written over it, so it is right only if:

- the previous version is verified, began checkpoint C and holds a qcow2 file
  of every disk, and the destination clones files (reflink);
- libvirt still has C and nothing began a checkpoint after it (a failed run,
  another tool): C is the guest's only latest checkpoint;
- every disk file is the one C was begun on (same device and inode, same size):
  a restore or a copy by hand replaces it;
- (stop-short, the guest off) every disk holds bitmap C, enabled and closed
  cleanly; QEMU killed mid-run leaves it in use. In snapshot mode libvirt itself
  refuses a missing or broken bitmap, and the backup then reads everything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.archive.manifest import CheckpointRecord
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.hypervisor.push_jobs import PushTarget


@dataclass(frozen=True)
class Base:
    """What an incremental backup builds on: checkpoint and the previous files."""

    checkpoint: str
    previous: int
    files: dict[str, Path]  # target -> the previous version's qcow2 file of that disk


def source_id(path: str) -> str:
    """``device:inode`` of a disk file; a file replaced since has another."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def choose_base(
    previous: VersionInfo | None,
    targets: Sequence[PushTarget],
    *,
    reflink: bool,
    leaves: Sequence[str] | None,
    sources: Mapping[str, str],
    sizes: Mapping[str, int],
) -> Base | str:
    """The base of an incremental backup, or why every block must be read.

    ``leaves`` are the guest's latest checkpoints (None: libvirt has no
    checkpoints here); ``sources`` and ``sizes`` the disks' ``source_id`` and
    virtual size now.
    """
    if previous is None:
        return "no earlier version"
    number = previous.number
    record = previous.manifest.checkpoint
    if record is None:
        return f"version {number} began no checkpoint"
    if not reflink:
        return "the destination has no reflink, so a version cannot start as a clone"
    if previous.verified is not True:
        return f"version {number} is not verified"
    files = _previous_files(previous, targets)
    if isinstance(files, str):
        return files
    if leaves is None:
        return "this libvirt has no checkpoints"
    if record.name not in leaves:
        return (
            f"libvirt has no checkpoint {record.name} of version {number} (guest redefined?)"
            if not leaves
            else f"checkpoint {record.name} of version {number} is not the guest's latest "
            "(a failed run, or another tool began one since)"
        )
    if len(leaves) != 1:
        return f"the guest has other checkpoints beside {record.name}: {', '.join(leaves)}"
    changed = _changed_disk(record, previous, targets, sources, sizes)
    if changed is not None:
        return changed
    return Base(record.name, number, files)


def _previous_files(previous: VersionInfo, targets: Sequence[PushTarget]) -> dict[str, Path] | str:
    disks = {d.target: d for d in previous.manifest.disks}
    files: dict[str, Path] = {}
    for target in targets:
        if target.fmt != "qcow2":
            return f"disk {target.target} is {target.fmt}; only qcow2 disks keep bitmaps"
        record = disks.get(target.target)
        if record is None or record.format != "qcow2" or record.chain:
            return f"version {previous.number} holds no qcow2 file of disk {target.target}"
        files[target.target] = previous.path / record.file
    return files


def _changed_disk(
    record: CheckpointRecord,
    previous: VersionInfo,
    targets: Sequence[PushTarget],
    sources: Mapping[str, str],
    sizes: Mapping[str, int],
) -> str | None:
    disks = {d.target: d for d in previous.manifest.disks}
    for target in targets:
        name = target.target
        if record.sources.get(name) is None or sources.get(name) != record.sources[name]:
            return (
                f"the file of disk {name} is not the one checkpoint {record.name} was begun on "
                "(restored or replaced since)"
            )
        if disks[name].source != target.source:
            return f"disk {name} is {target.source} now, {disks[name].source} then"
        if sizes.get(name) != disks[name].virtual_size:
            return f"disk {name} was resized since version {previous.number}"
    return None


def bitmaps_problem(
    base: Base, targets: Sequence[PushTarget], consistent: Callable[[Path, str], bool]
) -> str | None:
    """With the guest off: why some disk's bitmap cannot be trusted; None if all can."""
    for target in targets:
        if not consistent(Path(target.source), base.checkpoint):
            return (
                f"disk {target.target} holds no intact bitmap {base.checkpoint} (edited "
                "outside guestsafe, or QEMU stopped without closing it)"
            )
    return None
