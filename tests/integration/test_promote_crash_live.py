"""A promote --target-dir killed midway, running and shut off, of a real TCG clone:
recovery stops QEMU's unfinished mirror and deletes the half-made file, the clone
goes on as it was, and the next promote completes (issue #14)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, unique_name
from rig.gs import GS, file_digests

pytestmark = pytest.mark.integration

FAILPOINTS = "GUESTSAFE_FAILPOINTS"


def _disks(dom: libvirt.virDomain, flags: int = 0) -> dict[str, str]:
    root = ET.fromstring(dom.XMLDesc(flags))
    found = {}
    for disk in root.findall("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            found[target.get("dev", "")] = source.get("file", "")
    return found


def test_a_promote_killed_midway_leaves_no_stray_file_and_runs_again(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("prokill", start=False)
    target = guest_factory.workdir / "prokill-vms"  # a directory QEMU's user can reach
    target.mkdir()
    gs.job("prokill", [original])
    gs.cli("run", "prokill", check=True)
    version = gs.versions(original)[0]
    digests = file_digests(version)
    clone_name = unique_name("prokillnow")
    guest_factory.adopt(clone_name)
    gs.cli("boot", original.name, "1", clone_name, check=True)
    clone = libvirt_conn.lookupByName(clone_name)
    overlays = _disks(clone)

    killed = gs.cli(
        "promote",
        clone_name,
        "--target-dir",
        str(target),
        extra_env={FAILPOINTS: "promote.copy=kill"},
    )
    assert killed.returncode == -9, killed.stderr
    assert list(target.iterdir()), "the copy had not begun"
    dev = next(iter(overlays))
    assert clone.blockJobInfo(dev, 0), "QEMU's mirror outlives the killed promote"

    gs.cli("recover", check=True)

    assert list(target.iterdir()) == []
    assert clone.isActive() and not clone.blockJobInfo(dev, 0)
    assert _disks(clone) == overlays == _disks(clone, libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert all(Path(p).exists() for p in overlays.values())

    clone.destroy()
    killed = gs.cli(
        "promote",
        clone_name,
        "--target-dir",
        str(target),
        extra_env={FAILPOINTS: "promote.converted=kill"},
    )
    assert killed.returncode == -9, killed.stderr
    assert list(target.iterdir()), "qemu-img convert had written nothing"

    # The next promote settles the dead one's file first, then does the whole move.
    gs.cli("promote", clone_name, "--target-dir", str(target), check=True)

    moved = _disks(clone, libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert moved.keys() == overlays.keys()
    assert all(Path(p).parent == target for p in moved.values()), moved
    assert sorted(target.iterdir()) == sorted(Path(p) for p in moved.values())
    assert not any(Path(p).exists() for p in overlays.values())
    assert not list((gs.home / "state" / "booted").glob("*.json"))
    assert file_digests(version) == digests
    clone.create()  # it boots from its own files
    assert clone.isActive()
