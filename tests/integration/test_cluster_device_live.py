"""Cluster mode (issue 16): one job with ``hosts = ["local", "node2"]`` and a device
backs up the guests of two distinct hypervisors onto an external disk plugged in here.

``local`` is this machine's ``qemu:///system``; node2 is another libvirtd altogether:
the session daemon of the unprivileged user gsnode2, reached over SSH
(``qemu+libssh://gsnode2@127.0.0.1:PORT/session``, rig/sessionhost.py), with its own
guests, QEMU processes and a dir pool in its home. The device is a real loop disk
seen through udev and mounted by guestsafe for the run.
"""

from __future__ import annotations

import contextlib
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import (
    GuestAssets,
    GuestFactory,
    RigError,
    TestGuest,
    make_guest,
    make_traversable,
    require,
    unique_name,
)
from rig.gs import GS, boot_counter, shutdown_counter
from rig.loopdisk import LoopDisks, Part, make_loop_disks, mount_points
from rig.sessionhost import SessionHost, start_session_host

pytestmark = pytest.mark.integration


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    yield from make_loop_disks(tmp_path)


@pytest.fixture
def node2(workdir: Path) -> Iterator[tuple[SessionHost, libvirt.virConnect]]:
    """gsnode2's session libvirtd over the test sshd, and root's connection to it."""
    try:
        host = start_session_host(workdir)
    except (RigError, OSError, subprocess.CalledProcessError) as exc:
        require(False, f"cannot start node2 (a session libvirtd over ssh): {exc}")
        raise
    try:
        conn = libvirt.open(host.uri)
    except libvirt.libvirtError as exc:
        host.stop()
        require(False, f"cannot reach node2's session libvirtd over ssh: {exc}")
        raise
    try:
        yield host, conn
    finally:
        conn.close()
        host.stop()


@pytest.fixture
def node2_guest(
    node2: tuple[SessionHost, libvirt.virConnect], guest_assets: GuestAssets
) -> Iterator[TestGuest]:
    """A running TCG guest of node2, its disks in a dir pool of gsnode2's home."""
    host, conn = node2
    guest = make_guest(conn, host.home, unique_name("node2"), start=False, assets=guest_assets)
    pool = None
    try:
        host.give(guest.directory)  # its QEMU runs as gsnode2
        name = unique_name("pool")
        xml = (
            f"<pool type='dir'><name>{name}</name>"
            f"<target><path>{guest.directory}</path></target></pool>"
        )
        pool = conn.storagePoolCreateXML(xml, 0)
        guest.start()
        yield guest
    finally:
        guest.destroy_and_undefine()
        if pool is not None:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()


def test_one_job_backs_up_two_hosts_guests_onto_the_device(
    gs: GS,
    node2: tuple[SessionHost, libvirt.virConnect],
    node2_guest: TestGuest,
    guest_factory: GuestFactory,
    disks: LoopDisks,
    libvirt_conn: libvirt.virConnect,
    workdir: Path,
) -> None:
    host, conn2 = node2
    assert conn2.getURI() != libvirt_conn.getURI()
    with pytest.raises(libvirt.libvirtError):  # node2's guest is not local's: two hypervisors
        libvirt_conn.lookupByName(node2_guest.name)
    local = guest_factory("cluster", start=False)  # shut off: it must stay so
    part = disks(Part("ext4", 256, "gscluster")).partitions[0]
    config = gs.engine.paths.config_file
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[hosts.node2]\nuri = "{host.uri}"\n')
    gs.job("cluster", [local, node2_guest], hosts=["local", "node2"], device=part.spec)
    before = node2_guest.console_size()

    run = gs.cli("run", "cluster")

    assert run.returncode == 0, run.stderr
    at_shutdown = shutdown_counter(node2_guest, before)
    assert at_shutdown > 0 and node2_guest.is_running()  # stopped for the copy, back up
    assert local.state() == libvirt.VIR_DOMAIN_SHUTOFF
    assert not mount_points(part.node), "the device stayed mounted"

    verify = gs.cli("verify", "--device", part.spec)

    assert verify.returncode == 0, verify.stderr
    assert sorted(verify.stdout.splitlines()) == sorted(
        [f"{local.name} version 1: ok", f"node2/{node2_guest.name} version 1: ok"]
    )

    # Restore to any host: node2's version becomes a guest of this machine.
    clone = unique_name("cl2loc")
    target = workdir / "restored"
    target.mkdir(mode=0o755)
    make_traversable(target)
    guest_factory.adopt(clone)
    restore = gs.cli(
        "restore",
        node2_guest.name,
        "1",
        clone,
        "--host",
        "node2",
        "--to-host",
        "local",
        "--device",
        part.spec,
        "--target-dir",
        str(target),
        "--start",
    )

    assert restore.returncode == 0, restore.stderr
    root = ET.fromstring(libvirt_conn.lookupByName(clone).XMLDesc(0))
    sources = [Path(s.get("file", "")) for s in root.findall("./devices/disk/source")]
    assert sources and all(p.parent == target for p in sources), sources
    console = root.find("./devices/serial/source")
    assert console is not None
    assert boot_counter(Path(console.get("path", ""))) == at_shutdown
    assert not mount_points(part.node)
