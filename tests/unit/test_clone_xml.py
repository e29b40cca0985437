"""The clone's domain XML: what it must not share with the original (issue 12, cases 4-6)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_restoring import MAC_OTHER, MAC_WEB, UUID, Setup, build

from guestsafe.engine.errors import RestoreError
from guestsafe.engine.restore.clone import restore_clone
from guestsafe.engine.restore.clone_xml import CloneXml, build_clone_xml, free_tcp_port
from guestsafe.engine.restore.plan import KEEP, NEW, RestorePlan, choose_macs, plan_restore

NEW_UUID = "0b1c2d3e-0000-4000-8000-000000000001"

# Devices a real guest may carry, added to the test version's domain.xml.
EXTRA_DEVICES = """
    <serial type='tcp'>
      <source mode='bind' host='127.0.0.1' service='4555'/>
      <protocol type='raw'/>
      <target port='1'/>
    </serial>
    <serial type='tcp'>
      <source mode='connect' host='10.0.0.9' service='7000'/>
      <target port='2'/>
    </serial>
    <serial type='pty'>
      <log file='{logdir}/web-pty.log' append='on'/>
      <target port='3'/>
    </serial>
    <channel type='unix'>
      <source mode='connect' path='/run/collector/web.sock'/>
      <target type='virtio' name='org.example.collector'/>
    </channel>
    <parallel type='unix'>
      <source mode='bind' path='{logdir}/web-parallel.sock'/>
      <target port='0'/>
    </parallel>
    <graphics type='vnc' port='5907' autoport='no' websocket='5707' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' port='5930' tlsPort='5931' autoport='no'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='usb'>
      <source><vendor id='0x0781'/><product id='0x5567'/></source>
    </hostdev>
  </devices>
  <seclabel type='static' model='selinux' relabel='no'>
    <label>system_u:system_r:svirt_t:s0:c392,c662</label>
  </seclabel>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Example</entry>
      <entry name='uuid'>{uuid}</entry>
    </system>
  </sysinfo>
"""


def _with_extras(setup: Setup) -> RestorePlan:
    logdir = setup.root / "log"
    logdir.mkdir(exist_ok=True)
    xml = setup.xml.replace("  </devices>\n", EXTRA_DEVICES.format(logdir=logdir, uuid=UUID), 1)
    plan = _plan(setup, "web-copy")
    plan.xml = xml  # as if the version held this domain.xml
    return plan


def _plan(setup: Setup, name: str) -> RestorePlan:
    # Restored files go to a folder of the test's: the version's vdb came from /dev.
    target = setup.root / "restored"
    return plan_restore(
        setup.archive, "web", setup.version.number, name, setup.hv, target_dir=target
    )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return build(tmp_path)


@pytest.fixture
def clone(setup: Setup) -> CloneXml:
    plan = _with_extras(setup)
    return build_clone_xml(plan, NEW_UUID, choose_macs(plan, NEW, None), pick_port=lambda h: 45123)


def _root(clone: CloneXml) -> ET.Element:
    return ET.fromstring(clone.xml)


def _serial(root: ET.Element, port: str) -> ET.Element:
    found = [s for s in root.findall("./devices/serial") if s.findtext("target") is not None]
    [serial] = [s for s in found if s.find("target").get("port") == port]  # type: ignore[union-attr]
    return serial


# --- case 4 --------------------------------------------------------------------------


def test_case_04_sysinfo_uuid_is_the_clones(clone: CloneXml) -> None:
    root = _root(clone)
    entries = {e.get("name"): e.text for e in root.findall("./sysinfo/system/entry")}
    # libvirt refuses a guest whose SMBIOS UUID is not its own ("UUID mismatch").
    assert entries == {"manufacturer": "Example", "uuid": NEW_UUID}
    assert root.findtext("uuid") == NEW_UUID
    assert UUID not in clone.xml


# --- case 5 --------------------------------------------------------------------------


def test_case_05_fixed_display_ports_become_autoport(clone: CloneXml) -> None:
    vnc, spice = _root(clone).findall("./devices/graphics")
    assert vnc.attrib == {"type": "vnc", "autoport": "yes", "listen": "127.0.0.1"}
    assert spice.attrib == {"type": "spice", "autoport": "yes"}
    assert any(n.startswith("vnc display:") and "port 5907" in n for n in clone.notes)
    assert any(n.startswith("spice display:") and "tlsPort 5931" in n for n in clone.notes)


def test_case_05_tcp_serial_that_listens_gets_its_own_port(clone: CloneXml) -> None:
    root = _root(clone)
    bind = _serial(root, "1").find("source")
    assert bind is not None and bind.attrib == {
        "mode": "bind",
        "host": "127.0.0.1",
        "service": "45123",
    }
    connect = _serial(root, "2").find("source")  # a client of a server: kept as it was
    assert connect is not None and connect.get("service") == "7000"
    assert "serial 1: listens on TCP 127.0.0.1:45123 instead of the original's port 4555" in (
        clone.notes
    )


def test_case_05_a_free_tcp_port_is_one_nothing_listens_on() -> None:
    port = free_tcp_port("127.0.0.1")
    assert 1024 <= port <= 65535


def test_case_05_unix_sockets_connect_kept_bind_made_the_clones(
    clone: CloneXml, setup: Setup
) -> None:
    root = _root(clone)
    collector = [
        c.find("source")
        for c in root.findall("./devices/channel")
        if c.find("target").get("name") == "org.example.collector"  # type: ignore[union-attr]
    ]
    assert [s.attrib for s in collector if s is not None] == [
        {"mode": "connect", "path": "/run/collector/web.sock"}
    ]
    parallel = root.find("./devices/parallel/source")
    assert parallel is not None and parallel.get("mode") == "bind"
    assert parallel.get("path") == str(setup.root / "log" / "web-copy-web-parallel.sock")
    assert any(n.startswith("parallel 0: listens on") for n in clone.notes)
    pty_log = _serial(root, "3").find("log")
    assert pty_log is not None
    assert pty_log.get("file") == str(setup.root / "log" / "web-copy-web-pty.log")


def test_case_05_a_static_seclabel_becomes_dynamic(clone: CloneXml) -> None:
    [seclabel] = _root(clone).findall("seclabel")
    assert seclabel.attrib == {"type": "dynamic", "model": "selinux", "relabel": "yes"}
    assert list(seclabel) == []
    assert any("static system_u:system_r:svirt_t:s0:c392,c662" in n for n in clone.notes)


def test_case_05_hostdev_devices_are_dropped_with_a_note(setup: Setup) -> None:
    plan = _with_extras(setup)
    plan.xml = plan.xml.replace(
        "<interface type='bridge'>",
        "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' "
        "bus='0x04' slot='0x10' function='0x1'/></source></interface>\n<interface type='bridge'>",
    )
    clone = build_clone_xml(plan, NEW_UUID, ["52:54:00:00:00:01"] * 3, pick_port=lambda h: 1)
    root = _root(clone)
    assert root.findall("./devices/hostdev") == []
    assert [i.get("type") for i in root.findall("./devices/interface")] == ["network", "bridge"]
    dropped = [n for n in clone.notes if "dropped" in n]
    assert dropped == [
        "network interface (hostdev) bus=0x04 domain=0x0000 function=0x1 slot=0x10: dropped; "
        "it is passed through to the original",
        "host device pci bus=0x03 domain=0x0000 function=0x0 slot=0x00: dropped; "
        "it is passed through to the original",
        "host device usb 0x0781:0x5567: dropped; it is passed through to the original",
    ]


def test_case_05_the_restore_result_carries_the_notes(setup: Setup, tmp_path: Path) -> None:
    plan = _with_extras(setup)
    result = restore_clone(plan, setup.hv, setup.paths)  # type: ignore[arg-type]
    assert result.notes and all(isinstance(n, str) for n in result.notes)
    assert any("dropped" in n for n in result.notes)
    [defined] = setup.hv.defined
    assert "<hostdev" not in defined and 'autoport="yes"' in defined.replace("'", '"')


def test_a_plain_guest_gets_no_notes(setup: Setup) -> None:
    plan = _plan(setup, "web-copy")
    assert build_clone_xml(plan, NEW_UUID, choose_macs(plan, NEW, None)).notes == []


# --- case 6 --------------------------------------------------------------------------


def test_case_06_two_plans_keeping_one_mac_the_second_define_is_refused(
    setup: Setup, tmp_path: Path
) -> None:
    del setup.hv.guests["web"]  # the original is gone: its MACs clash with nobody
    first = _plan(setup, "web-a")
    second = _plan(setup, "web-b")
    assert not first.clashes and not second.clashes

    restore_clone(first, setup.hv, setup.paths, mac_policy=KEEP)  # type: ignore[arg-type]
    with pytest.raises(RestoreError, match=rf"MAC {MAC_WEB} is used by guest web-a"):
        restore_clone(second, setup.hv, setup.paths, mac_policy=KEEP)  # type: ignore[arg-type]

    assert list(setup.hv.guests) == ["web-a"]
    assert not any(
        p.name.startswith("web-b") for p in (setup.root / "restored").iterdir()
    )  # copies removed


def test_case_06_a_kept_clash_the_plan_showed_is_still_allowed(setup: Setup) -> None:
    plan = _plan(setup, "web-a")
    assert [i.clash_with for i in plan.interfaces] == ["web", "web"]
    result = restore_clone(plan, setup.hv, setup.paths, mac_policy=KEEP)  # type: ignore[arg-type]
    assert result.macs == [MAC_WEB, MAC_OTHER]


def test_case_06_two_plans_keeping_the_originals_mac_the_second_define_is_refused(
    setup: Setup,
) -> None:
    # Both know of the clash with the original; neither knows of the other clone.
    first = _plan(setup, "web-a")
    second = _plan(setup, "web-b")
    restore_clone(first, setup.hv, setup.paths, mac_policy=KEEP)  # type: ignore[arg-type]
    with pytest.raises(RestoreError, match=rf"MAC {MAC_WEB} is used by guest web-a"):
        restore_clone(second, setup.hv, setup.paths, mac_policy=KEEP)  # type: ignore[arg-type]
    assert sorted(setup.hv.guests) == ["web", "web-a"]


def test_case_06_a_new_mac_taken_meanwhile_is_made_up_again(setup: Setup) -> None:
    plan = _plan(setup, "web-a")
    stolen = plan.interfaces[0].new_mac
    setup.hv.guests["thief"] = (
        f"<domain><name>thief</name><devices><interface type='user'>"
        f"<mac address='{stolen}'/></interface></devices></domain>"
    )
    result = restore_clone(plan, setup.hv, setup.paths, mac_policy=NEW)  # type: ignore[arg-type]
    assert stolen not in result.macs and len(set(result.macs)) == 2
    assert not set(result.macs) & {MAC_WEB, MAC_OTHER}


def test_case_05_a_passed_through_tpm_is_dropped_an_emulated_one_starts_empty(
    setup: Setup,
) -> None:
    plan = _plan(setup, "web-copy")
    tpms = (
        "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend>"
        "</tpm><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>"
    )
    plan.xml = plan.xml.replace("</devices>", tpms)
    clone = build_clone_xml(plan, NEW_UUID, choose_macs(plan, NEW, None))
    [tpm] = _root(clone).findall("./devices/tpm")
    assert tpm.get("model") == "tpm-crb"
    assert [n for n in clone.notes if n.startswith("TPM")] == [
        "TPM: dropped; it is the host's TPM, passed through to the original",
        "TPM: starts empty; this version holds no TPM state",
    ]


def test_case_05_the_console_summary_lists_each_warning_and_note() -> None:
    from guestsafe.engine.restore.plan import RestoreResult
    from guestsafe.tui.restore_pane import restore_summary

    result = RestoreResult("web-copy", NEW_UUID, ["52:54:00:00:00:01"], [], False, ["w1"])
    result.notes = ["vnc display: gets free ports", "host device pci: dropped"]
    assert restore_summary(result).splitlines() == [
        "restore successful: web-copy is defined (MACs 52:54:00:00:00:01)",
        "warning: w1",
        "note: vnc display: gets free ports",
        "note: host device pci: dropped",
    ]
