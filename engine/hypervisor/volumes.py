"""Disks that are no file path in the domain XML: storage-pool volumes and network disks.

Storage-pool volumes (``<disk type='volume'>``) are resolved to what they really are.

A volume disk names a pool and a volume, not a path. libvirt's storage pool
API says where the volume lives (``path()``) and whether it is a file or a
block device (``info()``'s type), so the rest of guestsafe handles it like a
disk of that kind; the pool and volume stay on the ``DiskInfo`` (and in the
manifest) so people can see where it came from.
"""

from __future__ import annotations

from dataclasses import replace

import libvirt

from guestsafe.engine.errors import PreflightError
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo

# virStorageVolInfo's first field, as libvirt numbers it.
_KINDS = {
    libvirt.VIR_STORAGE_VOL_FILE: "file",
    libvirt.VIR_STORAGE_VOL_BLOCK: "block",
}


def resolve_disk(conn: libvirt.virConnect, disk: DiskInfo) -> DiskInfo:
    """The disk with a volume's path and kind; unchanged when it is no volume or unknown.

    An unresolvable volume (pool stopped, volume deleted) stays ``kind='volume'``:
    listing guests must still work, and preflight names the reason
    (``check_volumes``).
    """
    if disk.kind != "volume" or not disk.pool or not disk.volume:
        return disk
    try:
        pool = conn.storagePoolLookupByName(disk.pool)
        vol = pool.storageVolLookupByName(disk.volume)
        path = str(vol.path())
        kind = _KINDS.get(int(vol.info()[0]))
    except libvirt.libvirtError:
        return disk
    if kind is None:
        return disk  # a network or directory volume: not a file guestsafe can read
    return replace(disk, kind=kind, source=path)


def resolve_volumes(conn: libvirt.virConnect, info: GuestInfo) -> GuestInfo:
    """``info`` with every volume disk resolved to its file or device (see resolve_disk)."""
    if not any(d.kind == "volume" for d in info.disks):
        return info
    return replace(info, disks=[resolve_disk(conn, d) for d in info.disks])


def check_volumes(info: GuestInfo) -> None:
    """Refuse a volume disk libvirt could not resolve, before the guest is stopped."""
    for disk in info.disks:
        if disk.backs_up and disk.kind == "volume":
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} is volume {disk.volume!r} of storage "
                f"pool {disk.pool!r}, which libvirt cannot resolve to a file or block device "
                f"(start the pool with 'virsh pool-start {disk.pool}', or check that "
                f"'virsh vol-path --pool {disk.pool} {disk.volume}' answers)"
            )


def network_disks(info: GuestInfo) -> list[DiskInfo]:
    """The guest's writable network disks (rbd, iscsi, nbd, gluster ...)."""
    return [
        d
        for d in info.disks
        if d.kind == "network" and d.device in ("disk", "lun") and not d.readonly
    ]


def check_network_disks(info: GuestInfo, *, cold: bool) -> None:
    """Refuse, before anything stops, a network disk a cold copy would have to read.

    Only QEMU can open a network disk (it holds the protocol and the secrets), so
    it is read through QEMU's own push backup while the guest runs; with the guest
    off there is no reader.
    """
    for disk in network_disks(info):
        if cold:
            why = "mode stop reads disks" if info.state == "running" else "the guest is shut off"
            raise PreflightError(
                f"guest {info.name!r}: disk {disk.target} is a network disk ({disk.source}) "
                f"that only QEMU can read, and {why} with no QEMU running: use mode "
                "stop-short (QEMU reads it during a short stop) with the guest running"
            )
