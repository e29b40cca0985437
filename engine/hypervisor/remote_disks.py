"""A guest on another host: its disks are storage volumes read over libvirt's connection.

guestsafe reads a local guest's disk files itself. On a remote host
(``qemu+ssh://root@node2/system``) the same paths name files guestsafe cannot
open, so every disk must be a volume of a storage pool there: libvirt's
storage API finds it by path and streams it (``stream_copy.py``). A disk no
pool holds is refused before anything stops, naming the pool that would.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from guestsafe.engine.errors import PreflightError, RemoteDisksUnsupported
from guestsafe.engine.hypervisor.connection import Hypervisor, uri_is_remote
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo
from guestsafe.engine.modes import Mode


def is_remote(hv: Hypervisor) -> bool:
    """Whether guestsafe cannot read ``hv``'s guests' disk files through its own filesystem."""
    return uri_is_remote(hv.uri)


@dataclass(frozen=True)
class RemoteDisk:
    """One disk (or read-only image) and the storage volume that holds it on its host."""

    disk: DiskInfo
    pool: str
    volume: str
    length: int  # the volume's bytes as a file (a qcow2's own length, not its virtual size)
    allocation: int  # bytes allocated on the host: what crosses the wire at most


def remote_disks(
    conn: libvirt.virConnect, info: GuestInfo, disks: list[DiskInfo]
) -> list[RemoteDisk]:
    """Each disk's volume, or a PreflightError for the first one no pool holds."""
    return [volume_of(conn, info, disk) for disk in disks]


def volume_of(conn: libvirt.virConnect, info: GuestInfo, disk: DiskInfo) -> RemoteDisk:
    where = f"guest {info.name!r} on {conn.getURI()}: disk {disk.target}"
    if disk.kind not in ("file", "block") or not disk.source:
        raise PreflightError(
            f"{where} is a {disk.kind} disk ({disk.source}); on a remote host guestsafe "
            "reads disks that are volumes of a storage pool only"
        )
    try:
        vol = conn.storageVolLookupByPath(disk.source)
    except libvirt.libvirtError:
        raise PreflightError(
            f"{where} ({disk.source}) {_no_pool_advice(conn, disk.source)}"
        ) from None
    backing = _backing_path(vol)
    if backing is not None:
        raise PreflightError(
            f"{where} ({disk.source}) is an overlay on {backing}; over a remote connection "
            "guestsafe copies whole volumes only: flatten it first "
            f"('virsh blockpull {info.name} {disk.target}' while it runs) or back it up locally"
        )
    allocation = int(vol.info()[2])
    # info()'s capacity is what the guest sees (a qcow2's virtual size); the file's
    # own length, which the stream carries, is the physical size.
    length = int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
    pool = str(vol.storagePoolLookupByVolume().name())
    return RemoteDisk(disk, pool, str(vol.name()), length, allocation)


def _backing_path(vol: libvirt.virStorageVol) -> str | None:
    root = ET.fromstring(vol.XMLDesc(0))
    path = root.findtext("./backingStore/path")
    return path.strip() if path and path.strip() else None


def _no_pool_advice(conn: libvirt.virConnect, path: str) -> str:
    """Why no volume answers for ``path``, and the pool that would hold it."""
    folder = posixpath.dirname(path)
    for pool in conn.listAllStoragePools(0):
        target = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path")
        if target is None or target.rstrip("/") != folder.rstrip("/"):
            continue
        name = pool.name()
        if not pool.isActive():
            return (
                f"is in the folder of storage pool {name!r}, which is not running: "
                f"'virsh pool-start {name}'"
            )
        return (
            f"is in the folder of storage pool {name!r} but not one of its volumes: "
            f"'virsh pool-refresh {name}'"
        )
    return (
        "is not a volume of any storage pool on that host, and guestsafe reads a remote "
        f"guest's disks through pools only: define a dir pool for {folder} there "
        f"('virsh pool-define-as NAME dir --target {folder}', then pool-start and pool-autostart)"
    )


# Modes whose copy QEMU writes into files on the guest's host (a push backup):
# guestsafe cannot read those over the connection.
_PUSH_MODES = (Mode.STOP_SHORT, Mode.SNAPSHOT)


def check_remote_mode(info: GuestInfo, mode: str, uri: str) -> None:
    """Refuse, before anything stops, a mode a remote host cannot do for guestsafe."""
    if mode in _PUSH_MODES and info.state == "running":
        raise PreflightError(
            f"guest {info.name!r} on {uri}: mode {mode} has QEMU write the backup into files "
            "on that host, which guestsafe cannot read over the connection; use mode stop "
            "for remote hosts (the disks are streamed while the guest is off)"
        )


def check_remote_extras(info: GuestInfo, uri: str) -> None:
    """Refuse what lives outside storage pools on a remote host: NVRAM and TPM state."""
    if info.nvram:
        raise PreflightError(
            f"guest {info.name!r} on {uri}: its NVRAM ({info.nvram}) is no pool volume, and "
            "guestsafe does not yet read UEFI variables over a remote connection"
        )
    if info.emulated_tpm is not None:
        raise PreflightError(
            f"guest {info.name!r} on {uri}: its emulated TPM keeps state outside any storage "
            "pool, which guestsafe cannot read over a remote connection"
        )


def require_local_disks(hv: Hypervisor, guest: str, action: str) -> None:
    """Refuse ``action`` on ``guest``'s disks when they sit on another host.

    For what still writes files beside the guest (instant boot's overlays, a restore
    over the original); backups and new clones go through the storage-volume streams.
    """
    if is_remote(hv):
        raise RemoteDisksUnsupported(
            f"guest {guest!r} on {hv.uri}: {action} over a remote connection is not "
            "supported yet (it needs files on that host)"
        )
