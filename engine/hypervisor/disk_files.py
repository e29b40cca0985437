"""Facts about a guest's disk files that preflight needs before anything stops."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from guestsafe.engine.copier import device_size
from guestsafe.engine.errors import PreflightError
from guestsafe.engine.hypervisor import chains
from guestsafe.engine.hypervisor.domain_xml import GuestInfo

_QCOW2_MAGIC = b"QFI\xfb"


def archive_file_name(target: str, fmt: str | None) -> str:
    """The file name a disk gets inside a version: ``vda.qcow2``, ``vdb.raw``, ``nvram.fd``."""
    return f"{target}.{fmt or 'raw'}"


def virtual_size(path: Path, fmt: str | None) -> int:
    """The size the guest sees: the qcow2 header's, or the file's (or device's) length for raw.

    ``fmt`` comes from libvirt's ``<driver type>`` (None: raw), never from the
    bytes: the first sector of a raw disk is the guest's to write.
    """
    if fmt != "qcow2":
        return byte_length(path)
    with path.open("rb") as f:
        header = f.read(32)
    if len(header) == 32 and header[:4] == _QCOW2_MAGIC:
        return int(struct.unpack(">Q", header[24:32])[0])
    return byte_length(path)


def byte_length(path: Path) -> int:
    """A file's length, or a block device's size (its st_size is 0)."""
    st = path.stat()
    return device_size(path) if stat.S_ISBLK(st.st_mode) else st.st_size


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def check_backup_disks(info: GuestInfo) -> None:
    """Refuse disks a file copy cannot save whole, before the guest is stopped."""
    for disk in info.disks:
        if not disk.backs_up:
            continue
        if disk.kind not in ("file", "block"):
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} is a {disk.kind} disk ({disk.source}); "
                "this version backs up file and block-device disks only"
            )
        assert disk.source is not None
        path = Path(disk.source)
        if disk.kind == "block" and not is_block_device(path):
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} device {path} is missing or not a "
                "block device (activate the LV or plug the disk in, then run the job again)"
            )
        if disk.kind == "file" and not path.is_file():
            raise PreflightError(f"guest {info.name!r}: disk {disk.target} file {path} is missing")
        # An overlay is saved with its backing chain (chain_copy.py); one whose chain
        # cannot be read or holds what a file copy cannot save is refused here.
        chains.check_chain(info.name, disk)
    if info.nvram and not Path(info.nvram).is_file():
        raise PreflightError(f"guest {info.name!r}: NVRAM file {info.nvram} is missing")


def allocated_bytes(path: Path) -> int:
    """What a copy may take: a file's allocation; all of a device (it has no holes to count)."""
    if is_block_device(path):
        return device_size(path)
    return os.stat(path).st_blocks * 512


def allocated_total(info: GuestInfo) -> int:
    paths = [Path(d.source) for d in info.disks if d.backs_up and d.source]
    if info.nvram:
        paths.append(Path(info.nvram))
    return sum(allocated_bytes(p) for p in paths if p.exists())


def free_space(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
