"""libvirt checkpoints: persistent dirty bitmaps that say which clusters changed.

A push backup may begin a checkpoint at the same instant (virDomainBackupBegin's
second XML): QEMU then keeps, in each qcow2 disk, a bitmap of the clusters the
guest writes from that moment on. The next push backup with ``<incremental>``
naming it has QEMU copy only those clusters. guestsafe names its checkpoints
``guestsafe-...`` and keeps only the one of its latest version.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import libvirt

PREFIX = "guestsafe-"
# What libvirt says when a checkpoint or its bitmap is gone or broken.
CHAIN_ERRORS = (libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT)


def new_name() -> str:
    """A checkpoint name nobody else picks: the time, and a random tail."""
    return f"{PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def checkpoint_xml(name: str, targets: Sequence[str], others: Sequence[str]) -> str:
    """A <domaincheckpoint> with a bitmap on ``targets`` and none on ``others``."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for target in targets:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap")
    for target in others:
        ET.SubElement(disks, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


def supported() -> bool:
    """Whether this libvirt-python has the checkpoint calls."""
    return hasattr(libvirt.virDomain, "checkpointLookupByName")


def leaves(dom: libvirt.virDomain) -> list[str]:
    """The guest's checkpoints that have no child: the latest of each line."""
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES
    return sorted(c.getName() for c in dom.listAllCheckpoints(flags))


def exists(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError:
        return False
    return True


def drop_others(dom: libvirt.virDomain, keep: str) -> list[str]:
    """Delete guestsafe's checkpoints but ``keep``: their bitmaps cost every guest write."""
    dropped = []
    for checkpoint in dom.listAllCheckpoints(0):
        name = checkpoint.getName()
        if name.startswith(PREFIX) and name != keep:
            checkpoint.delete(0)
            dropped.append(name)
    return dropped


def bitmap_consistent(image: Path, name: str) -> bool:
    """Whether the qcow2 file of a guest that is off holds bitmap ``name``, intact.

    QEMU marks a bitmap ``in-use`` while it runs and clears that flag when it
    closes the image; one left in use (QEMU killed) may miss writes. A bitmap
    that is not ``auto`` was disabled and missed writes too.
    """
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return False
    try:
        data = json.loads(result.stdout)
        bitmaps = data["format-specific"]["data"].get("bitmaps", [])
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    for bitmap in bitmaps:
        if isinstance(bitmap, dict) and bitmap.get("name") == name:
            flags = bitmap.get("flags", [])
            return "auto" in flags and "in-use" not in flags
    return False


def is_chain_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in CHAIN_ERRORS
