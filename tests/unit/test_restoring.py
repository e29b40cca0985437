"""Restore against a fake hypervisor: planning a clone, its domain XML, restoring over.

The versions are real ones, written with the archive API into a temporary
directory; only libvirt is replaced, by ``FakeHypervisor``, so these run in
moments where tests/integration/test_restore.py boots real guests.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import RestoreError, VerifyError
from guestsafe.engine.events import Event, PhaseChanged
from guestsafe.engine.hypervisor.domain_xml import GuestInfo, GuestState, parse_domain_xml
from guestsafe.engine.modes import Mode
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.clone import restore_clone
from guestsafe.engine.restore.clone_xml import rewrite_clone_xml
from guestsafe.engine.restore.over_original import restore_over_original
from guestsafe.engine.restore.plan import (
    KEEP,
    MAC_PREFIX,
    NEW,
    MacChoice,
    RestorePlan,
    choose_macs,
    new_mac,
    plan_restore,
)

UUID = "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
MAC_WEB = "52:54:00:aa:bb:01"  # the source guest's first interface
MAC_OTHER = "52:54:00:aa:bb:02"  # its second one
STAMP = "2025-03-01T02:00:00+00:00"
LV = Path("/dev/vg0/web-data")  # vdb is a logical volume, a block disk

DOMAIN_XML = """<domain type='kvm'>
  <name>web</name>
  <uuid>{uuid}</uuid>
  <os><type>hvm</type><nvram>{nvram}</nvram></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{vda}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='{vdb}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/installer.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='{mac0}'/>
      <source network='default'/>
      <target dev='vnet7'/>
    </interface>
    <interface type='bridge'>
      <mac address='{mac1}'/>
      <source bridge='br0'/>
    </interface>
    <serial type='file'>
      <source path='{console}'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


@dataclass
class FakeHypervisor:
    """The few calls restore makes, on a dict of domain XML by guest name."""

    guests: dict[str, str] = field(default_factory=dict)
    states: dict[str, GuestState] = field(default_factory=dict)
    defined: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    def exists(self, name: str) -> bool:
        return name in self.guests

    def all_macs(self) -> dict[str, str]:
        return {mac: owners[0] for mac, owners in self.mac_owners().items()}

    def mac_owners(self) -> dict[str, list[str]]:
        macs: dict[str, list[str]] = {}
        for xml in self.guests.values():
            info = parse_domain_xml(xml)
            for mac in info.macs:
                owners = macs.setdefault(mac, [])
                if info.name not in owners:
                    owners.append(info.name)
        return macs

    def define(self, xml: str) -> GuestInfo:
        info = parse_domain_xml(xml)
        self.guests[info.name] = xml
        self.defined.append(xml)
        return info

    def start(self, name: str) -> None:
        self.started.append(name)
        self.states[name] = GuestState.RUNNING

    def state(self, name: str) -> str:
        return self.states.get(name, GuestState.SHUTOFF)

    # Restore over the original also asks these.
    uri: str = "test:///fake"
    managed_saves: set[str] = field(default_factory=set)
    start_event: threading.Event = field(default_factory=threading.Event)

    def disk_users(self) -> dict[str, set[str]]:
        users: dict[str, set[str]] = {}
        for xml in self.guests.values():
            info = parse_domain_xml(xml)
            for source in [d.source for d in info.disks] + [info.nvram]:
                if source:
                    users.setdefault(source, set()).add(info.name)
        return users

    def has_managed_save(self, name: str) -> bool:
        return name in self.managed_saves

    def discard_managed_save(self, name: str) -> None:
        self.managed_saves.discard(name)

    @contextmanager
    def watch_started(self, name: str) -> Iterator[threading.Event]:
        yield self.start_event


@dataclass
class Setup:
    root: Path  # the test's temporary directory
    archive: Archive
    images: Path
    paths: Paths
    hv: FakeHypervisor
    version: VersionInfo
    data: dict[str, bytes]  # version file name -> contents
    xml: str  # the version's domain.xml


def _digest(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def _record(target: str, source: Path, file: str, data: bytes) -> DiskRecord:
    fmt = file.rsplit(".", 1)[-1]
    return DiskRecord(target, str(source), fmt, len(data), len(data), file, _digest(data))


def build(root: Path, *, vdb_source: Path = LV) -> Setup:
    """A committed version of guest ``web`` (vda, vdb, NVRAM), and a hypervisor with web."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    sources = {
        "vda": images / "web-vda.qcow2",
        "nvram": root / "nvram" / "web_VARS.fd",
        "console": root / "log" / "web-console.log",
    }
    xml = DOMAIN_XML.format(
        uuid=UUID,
        nvram=sources["nvram"],
        vda=sources["vda"],
        vdb=vdb_source,
        mac0=MAC_WEB,
        mac1=MAC_OTHER,
        console=sources["console"],
    )
    data = {
        "vda.qcow2": os.urandom(3000),
        "vdb.raw": b"\0" * 8192 + os.urandom(100),
        "nvram.fd": os.urandom(512),
    }
    archive = Archive.open(root / "backup", create=True)
    partial = archive.begin("web")
    partial.write_domain_xml(xml)
    for name, contents in data.items():
        partial.file_path(name).write_bytes(contents)
    disks = [
        _record("vda", sources["vda"], "vda.qcow2", data["vda.qcow2"]),
        _record("vdb", vdb_source, "vdb.raw", data["vdb.raw"]),
    ]
    nvram = _record("nvram", sources["nvram"], "nvram.fd", data["nvram.fd"])
    manifest = Manifest(1, "web", UUID, "hv1", Mode.STOP, STAMP, STAMP, 10.0, "0.1.0", disks, nvram)
    version = partial.commit(manifest)
    home = root / "home"
    paths = Paths(home / "jobs.toml", home / "state", home / "log", home / "cache")
    hv = FakeHypervisor(guests={"web": xml})
    return Setup(root, archive, images, paths, hv, version, data, xml)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return build(tmp_path)


def _plan(setup: Setup, name: str = "web-copy", **kw: Path) -> RestorePlan:
    return plan_restore(setup.archive, "web", setup.version.number, name, setup.hv, **kw)  # type: ignore[arg-type]


# --- planning a clone ----------------------------------------------------------


def test_a_clone_plan_gets_new_paths_beside_the_sources(setup: Setup) -> None:
    plan = _plan(setup)
    assert plan.new_name == "web-copy" and plan.xml == setup.xml and plan.xml_problem is None
    paths = {rec.target: dst for rec, dst in plan.disks}
    assert paths == {
        "vda": setup.images / "web-copy-vda.qcow2",
        "vdb": Path("/dev/vg0/web-copy-vdb.raw"),
    }
    assert plan.nvram is not None
    assert plan.nvram[1] == setup.root / "nvram" / "web-copy-nvram.fd"


def test_a_clone_never_takes_the_path_of_an_existing_file(setup: Setup, tmp_path: Path) -> None:
    taken = setup.images / "web-copy-vda.qcow2"
    taken.write_bytes(b"someone else's disk")
    (setup.images / "1-web-copy-vda.qcow2").write_bytes(b"and another")
    plan = _plan(setup)
    vda = dict((r.target, p) for r, p in plan.disks)["vda"]
    assert vda == setup.images / "2-web-copy-vda.qcow2"
    # With a target directory every file goes there, still under a name of its own.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "web-copy-vdb.raw").write_bytes(b"x")
    plan = _plan(setup, target_dir=target)
    placed = [p for _, p in plan.disks] + ([plan.nvram[1]] if plan.nvram else [])
    assert placed == [
        target / "web-copy-vda.qcow2",
        target / "1-web-copy-vdb.raw",
        target / "web-copy-nvram.fd",
    ]
    assert taken.read_bytes() == b"someone else's disk"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("web", "already defined"),
        ("", "empty or has surrounding spaces"),
        (" web-copy", "empty or has surrounding spaces"),
        ("web/copy", "libvirt refuses such names"),
    ],
)
def test_a_clone_name_that_cannot_be_used_is_refused(setup: Setup, name: str, problem: str) -> None:
    with pytest.raises(RestoreError, match=problem):
        _plan(setup, name)


def test_a_mac_any_guest_uses_is_a_clash_and_new_replaces_only_clashes(setup: Setup) -> None:
    setup.hv.guests["db"] = setup.xml.replace("<name>web</name>", "<name>db</name>").replace(
        MAC_WEB, "52:54:00:cc:cc:cc"
    )
    plan = _plan(setup)
    first, second = plan.interfaces
    assert (first.mac, first.clash_with) == (MAC_WEB, "web")
    assert (second.mac, second.clash_with) == (MAC_OTHER, "web")
    # Now only the first MAC is in use anywhere.
    del setup.hv.guests["web"]
    setup.hv.guests["db"] = setup.xml.replace("<name>web</name>", "<name>db</name>").replace(
        MAC_OTHER, "52:54:00:cc:cc:cc"
    )
    plan = _plan(setup)
    first, second = plan.interfaces
    assert first.clashes and first.clash_with == "db" and not second.clashes
    assert [i.mac for i in plan.clashes] == [MAC_WEB]
    # new: the clashing MAC is replaced, the free one kept.
    assert choose_macs(plan, NEW, None) == [first.new_mac, MAC_OTHER]
    # keep: both kept, clash and all.
    assert choose_macs(plan, KEEP, None) == [MAC_WEB, MAC_OTHER]
    # A choice per interface wins over the policy.
    assert choose_macs(plan, NEW, {0: MacChoice.KEEP, 1: "new"}) == [MAC_WEB, second.new_mac]
    with pytest.raises(RestoreError, match="choose 'keep' or 'new', not 'maybe'"):
        choose_macs(plan, NEW, {1: "maybe"})


def test_new_macs_are_local_qemu_macs_no_guest_uses(setup: Setup) -> None:
    plan = _plan(setup)
    used = set(setup.hv.all_macs())
    fresh = [i.new_mac for i in plan.interfaces]
    assert len(set(fresh)) == len(fresh) and not used & set(fresh)
    assert all(mac.startswith(MAC_PREFIX + ":") and len(mac) == 17 for mac in fresh)
    taken = {MAC_WEB}
    mac = new_mac(taken)
    assert mac != MAC_WEB and mac in taken  # handed out once, then taken


# --- the clone's domain XML ------------------------------------------------------


def test_the_clone_xml_has_the_new_name_uuid_files_and_macs(setup: Setup) -> None:
    plan = _plan(setup)
    macs = choose_macs(plan, NEW, None)
    root = ET.fromstring(rewrite_clone_xml(plan, "0b1c2d3e-0000-4000-8000-000000000001", macs))
    assert root.findtext("name") == "web-copy"
    assert root.findtext("uuid") == "0b1c2d3e-0000-4000-8000-000000000001"
    assert len(root.findall("uuid")) == 1
    disks = {d.find("target").get("dev"): d for d in root.findall("./devices/disk")}  # type: ignore[union-attr]
    new_paths = {rec.target: str(dst) for rec, dst in plan.disks}
    for target in ("vda", "vdb"):
        source = disks[target].find("source")
        assert source is not None and source.attrib == {"file": new_paths[target]}
        assert disks[target].get("type") == "file"  # the block disk is a file now
    cdrom = disks["sda"].find("source")
    assert cdrom is not None and cdrom.get("file") == "/srv/iso/installer.iso"  # not restored
    assert plan.nvram is not None and root.findtext("./os/nvram") == str(plan.nvram[1])
    interfaces = root.findall("./devices/interface")
    assert [i.find("mac").get("address") for i in interfaces] == macs  # type: ignore[union-attr]
    assert all(i.find("target") is None for i in interfaces)  # libvirt names the tap anew
    console = root.find("./devices/serial/source")
    assert console is not None and Path(console.get("path", "")).name == (
        "web-copy-web-console.log"
    )
    channel = root.find("./devices/channel/source")
    assert channel is not None and "path" not in channel.attrib  # libvirt picks the socket


def test_the_clone_xml_adds_a_mac_and_a_uuid_where_there_were_none(setup: Setup) -> None:
    plan = _plan(setup)
    bare = ET.fromstring(plan.xml)
    bare.remove(bare.find("uuid"))  # type: ignore[arg-type]
    for iface in bare.findall("./devices/interface"):
        iface.remove(iface.find("mac"))  # type: ignore[arg-type]
    plan.xml = ET.tostring(bare, encoding="unicode")
    root = ET.fromstring(rewrite_clone_xml(plan, UUID.replace("6f", "7f"), ["m1", "m2"]))
    assert root.findtext("uuid") == UUID.replace("6f", "7f")
    assert [i.find("mac").get("address") for i in root.findall("./devices/interface")] == [  # type: ignore[union-attr]
        "m1",
        "m2",
    ]


# --- restoring a clone -------------------------------------------------------------


def test_restoring_a_clone_copies_the_files_and_defines_it(setup: Setup, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    plan = _plan(setup, target_dir=target)
    events: list[Event] = []
    result = restore_clone(plan, setup.hv, setup.paths, reporter=events.append)  # type: ignore[arg-type]
    assert result.name == "web-copy" and result.uuid != UUID and not result.started
    assert [p.read_bytes() for p in result.disk_paths] == [
        setup.data["vda.qcow2"],
        setup.data["vdb.raw"],
        setup.data["nvram.fd"],
    ]
    [xml] = setup.hv.defined
    info = parse_domain_xml(xml)
    assert (info.name, info.uuid) == ("web-copy", result.uuid)
    assert info.macs == result.macs and info.macs[0] != MAC_WEB  # the clash got a new MAC
    assert [e.phase for e in events if isinstance(e, PhaseChanged)] == ["copy", "define"]
    assert setup.hv.started == [] and setup.hv.guests["web"] == setup.xml  # source untouched


def test_a_clone_can_be_started_and_keep_its_macs(setup: Setup, tmp_path: Path) -> None:
    plan = _plan(setup, target_dir=tmp_path / "restored")
    result = restore_clone(plan, setup.hv, setup.paths, mac_policy=KEEP, start=True)  # type: ignore[arg-type]
    assert result.started and setup.hv.started == ["web-copy"]
    assert result.macs == [MAC_WEB, MAC_OTHER]


def test_a_damaged_disk_file_leaves_nothing_behind(setup: Setup, tmp_path: Path) -> None:
    (setup.version.path / "vdb.raw").write_bytes(b"bit rot")
    target = tmp_path / "restored"
    plan = _plan(setup, target_dir=target)
    with pytest.raises(VerifyError, match=r"vdb\.raw of web version 1 does not match"):
        restore_clone(plan, setup.hv, setup.paths)  # type: ignore[arg-type]
    assert list(target.iterdir()) == [] and setup.hv.defined == []


def test_a_name_defined_meanwhile_is_not_overwritten(setup: Setup, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    plan = _plan(setup, target_dir=target)
    setup.hv.guests["web-copy"] = "<domain><name>web-copy</name></domain>"
    with pytest.raises(RestoreError, match="defined meanwhile"):
        restore_clone(plan, setup.hv, setup.paths)  # type: ignore[arg-type]
    assert list(target.iterdir()) == [] and setup.hv.defined == []


# --- restoring over the original ---------------------------------------------------


def _place_originals(setup: Setup) -> dict[Path, bytes]:
    """Files at every source of the version, as the guest has them now."""
    originals = {}
    for rec in setup.version.manifest.records:
        path = Path(rec.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"current " + rec.file.encode())
        originals[path] = path.read_bytes()
    return originals


@pytest.fixture
def over(tmp_path: Path) -> Setup:
    """A version whose disks are all files, so restoring over writes no device node."""
    return build(tmp_path, vdb_source=tmp_path / "images" / "web-vdb.raw")


@pytest.mark.parametrize("state", [GuestState.RUNNING, GuestState.PAUSED])
def test_restoring_over_a_guest_that_is_not_shut_off_is_refused(
    over: Setup, state: GuestState
) -> None:
    originals = _place_originals(over)
    over.hv.states["web"] = state
    with pytest.raises(RestoreError, match=f"guest 'web' is {state}; shut it off"):
        restore_over_original(over.archive, "web", 1, over.hv, over.paths)  # type: ignore[arg-type]
    assert {p: p.read_bytes() for p in originals} == originals
    assert over.hv.defined == []


def test_restoring_over_a_shut_off_guest_replaces_its_files(over: Setup) -> None:
    originals = _place_originals(over)
    result = restore_over_original(over.archive, "web", 1, over.hv, over.paths)  # type: ignore[arg-type]
    assert over.hv.defined == [over.xml]  # the version's own XML: same name, UUID, MACs
    assert (result.name, result.uuid, result.macs) == ("web", UUID, [MAC_WEB, MAC_OTHER])
    by_source = {Path(r.source): over.data[r.file] for r in over.version.manifest.records}
    assert {p: p.read_bytes() for p in originals} == by_source
    leftovers = [p for p in over.root.rglob("*") if "guestsafe-aside" in p.name]
    assert leftovers == []


def test_a_failed_restore_over_puts_the_files_back(over: Setup) -> None:
    originals = _place_originals(over)
    (over.version.path / "vdb.raw").write_bytes(b"bit rot")
    with pytest.raises(VerifyError, match="does not match its manifest"):
        restore_over_original(over.archive, "web", 1, over.hv, over.paths)  # type: ignore[arg-type]
    assert {p: p.read_bytes() for p in originals} == originals
    assert over.hv.defined == []
    assert [p for p in over.root.rglob("*") if "guestsafe-aside" in p.name] == []
