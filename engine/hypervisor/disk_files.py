"""Facts about a guest's disk files that preflight needs before anything stops."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from guestsafe.engine.errors import PreflightError
from guestsafe.engine.hypervisor.domain_xml import GuestInfo

_QCOW2_MAGIC = b"QFI\xfb"


def archive_file_name(target: str, fmt: str | None) -> str:
    """The file name a disk gets inside a version: ``vda.qcow2``, ``vdb.raw``, ``nvram.fd``."""
    return f"{target}.{fmt or 'raw'}"


def qcow2_backing_file(path: Path, fmt: str | None) -> str | None:
    """The backing file a qcow2 header names, read without qemu-img.

    ``fmt`` is libvirt's ``<driver type>``: a raw disk whose guest wrote a qcow2
    header into its first sector is still raw, and has no backing file.
    """
    if fmt != "qcow2":
        return None
    with path.open("rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
        return None
    offset, size = struct.unpack(">QI", header[8:20])
    if offset == 0 or size == 0:
        return None
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size).decode("utf-8", "replace")


def virtual_size(path: Path, fmt: str | None) -> int:
    """The size the guest sees: the qcow2 header's, or the file's length for raw.

    ``fmt`` comes from libvirt's ``<driver type>`` (None: raw), never from the
    bytes: the first sector of a raw disk is the guest's to write.
    """
    if fmt != "qcow2":
        return path.stat().st_size
    with path.open("rb") as f:
        header = f.read(32)
    if len(header) == 32 and header[:4] == _QCOW2_MAGIC:
        return int(struct.unpack(">Q", header[24:32])[0])
    return path.stat().st_size


def check_backup_disks(info: GuestInfo) -> None:
    """Refuse disks a file copy cannot save whole, before the guest is stopped."""
    for disk in info.disks:
        if not disk.backs_up:
            continue
        if disk.kind != "file":
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} is a {disk.kind} disk ({disk.source}); "
                "this version backs up file disks only"
            )
        assert disk.source is not None
        path = Path(disk.source)
        if not path.is_file():
            raise PreflightError(f"guest {info.name!r}: disk {disk.target} file {path} is missing")
        backing = qcow2_backing_file(path, disk.format)
        if backing is not None:
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} ({path}) is an overlay on {backing}; "
                "saving the overlay alone would not restore, so guestsafe refuses it "
                "(flatten it with 'qemu-img convert' or 'virsh blockpull' first)"
            )
    if info.nvram and not Path(info.nvram).is_file():
        raise PreflightError(f"guest {info.name!r}: NVRAM file {info.nvram} is missing")


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def allocated_total(info: GuestInfo) -> int:
    paths = [Path(d.source) for d in info.disks if d.backs_up and d.source]
    if info.nvram:
        paths.append(Path(info.nvram))
    return sum(allocated_bytes(p) for p in paths if p.exists())


def free_space(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
