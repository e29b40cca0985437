"""Issue 11: the guests a real host runs that a plain disk copy gets wrong.

An emulated TPM (its swtpm state kept and put back), a transient guest
(created again after the copy), a shareable disk another running guest uses
and a managed-save image (both refused before anything stops), and a raw disk
whose first sector spells a qcow2 header (still copied as raw).
"""

from __future__ import annotations

import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import blake3
import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest
from rig.gs import BOOT, GS, boot_counter, shutdown_counter
from rig.guest import find_domain

pytestmark = pytest.mark.integration

SWTPM_ROOT = Path("/var/lib/libvirt/swtpm")
TPM = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
TWO_DISKS = (DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 16 * MiB))


def _b3(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def _redefine(
    guest: TestGuest,
    change: str,
    device_xml: str = "",
    target: str = "",
    kernel: Path | None = None,
) -> None:
    """Define the (shut-off) guest again with a device added, or a disk made shareable."""
    root = ET.fromstring(
        guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    )
    devices = root.find("devices")
    assert devices is not None
    if change == "add":
        devices.append(ET.fromstring(device_xml))
    elif change == "shareable":
        [disk] = [
            d for d in devices.findall("disk") if d.find(f"target[@dev='{target}']") is not None
        ]
        ET.SubElement(disk, "shareable")
    if kernel is not None:
        kernel_element = root.find("os/kernel")
        assert kernel_element is not None
        kernel_element.text = str(kernel)
    guest.conn.defineXML(ET.tostring(root, encoding="unicode"))


def _state_file(guest: TestGuest) -> Path:
    return SWTPM_ROOT / guest.dom.UUIDString() / "tpm2" / "tpm2-00.permall"


def _boot_counter(guest: TestGuest, offset: int) -> int:
    return int(guest.wait_for_console(BOOT, timeout=90, after=offset).group(1))


def _nothing_written(gs: GS, guest: TestGuest) -> None:
    assert gs.versions(guest) == [] and gs.partials() == []


def test_tpm_state_is_kept_refused_in_snapshot_and_back_after_restore_over_original(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("tpm", start=False)
    # With a TPM, SeaBIOS's ACPI tables do not survive the rig's PVH boot (the guest
    # then ignores the power button); the same kernel as a bzImage boots them fine.
    _redefine(guest, "add", TPM, kernel=guest_factory.assets.bzimage)
    guest.start()  # swtpm makes the state at the first start
    state = _state_file(guest)
    assert state.is_file(), f"no swtpm state at {state}"

    # Snapshot: refused before anything stops, naming the modes that work.
    gs.job("snap", [guest], mode="snapshot")
    offset = guest.console_size()
    refused = gs.engine.run_job("snap")
    assert not refused.ok
    assert "use mode stop or stop-short" in refused.outcomes[0].message
    assert guest.is_running() and "GS-POWEROFF" not in guest.console_text(offset)
    _nothing_written(gs, guest)

    gs.job("tpm", [guest])
    offset = guest.console_size()
    assert gs.engine.run_job("tpm").ok
    at_backup = shutdown_counter(guest, offset)
    [version] = gs.versions(guest)
    tpm = version.manifest.tpm
    assert version.manifest.format == 3  # 2 and up: an older guestsafe refuses it
    assert tpm is not None and tpm.version == "2.0" and tpm.state_dir == str(state.parent)
    [record] = tpm.files
    assert record.source == str(state)
    kept = version.path / record.file
    assert _b3(kept) == record.blake3
    assert "tpm-tpm2-00.permall" in (version.path / "B3SUMS").read_text()
    assert gs.cli("verify", guest.name, "1").returncode == 0

    # The state is lost; a restore over the original puts the version's back.
    guest.wait_for_console(r"GS-POWEROFF[\s\S]*GS-READY", timeout=90, after=offset)
    guest.shutdown()
    state.write_bytes(b"not a TPM state")
    proc = gs.cli("restore", guest.name, "1", "--overwrite", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert _b3(state) == record.blake3
    offset = guest.start()  # swtpm accepts the restored state: the guest boots
    assert _boot_counter(guest, offset) == at_backup  # and its disk is the version's

    # A clone gets a copy under its own UUID, and is told it shares the TPM identity.
    clone_name = f"{guest.name}-c"
    guest_factory.adopt(clone_name)
    cloned = gs.cli("restore", guest.name, "1", clone_name, check=True)
    assert "shares the original's TPM identity" in cloned.stdout + cloned.stderr
    clone_uuid = guest.conn.lookupByName(clone_name).UUIDString()
    assert _b3(SWTPM_ROOT / clone_uuid / "tpm2" / "tpm2-00.permall") == record.blake3


def test_a_tpm_guest_in_stop_short_keeps_the_state_copied_while_it_was_off(
    gs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    gs.archive = workdir / "archive"  # QEMU writes the disks: pytest's tmp dirs are 0700
    gs.archive.mkdir(mode=0o700)
    guest = guest_factory("tpmshort", start=False)
    _redefine(guest, "add", TPM, kernel=guest_factory.assets.bzimage)
    guest.start()
    gs.job("short", [guest], mode="stop-short")

    result = gs.engine.run_job("short")

    assert result.ok, result.outcomes[0].message
    assert guest.is_running()
    [version] = gs.versions(guest)
    assert version.manifest.mode == "stop-short"
    assert version.manifest.tpm is not None
    [record] = version.manifest.tpm.files
    assert _b3(version.path / record.file) == record.blake3
    assert gs.cli("verify", guest.name, "1").returncode == 0


def test_a_transient_guest_runs_again_after_the_backup_and_its_counter_continues(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("transient", start=False)
    xml = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    guest.dom.undefine()
    guest.conn.createXML(xml, 0)  # 'virsh create': running, not defined
    guest.wait_for_console("GS-READY", timeout=90)
    assert not guest.dom.isPersistent()
    offset = guest.console_size()

    gs.job("transient", [guest])
    result = gs.engine.run_job("transient")

    assert result.ok, result.outcomes[0].message
    at_shutdown = shutdown_counter(guest, offset)
    assert guest.is_running() and not guest.dom.isPersistent()
    assert _boot_counter(guest, offset) == at_shutdown
    [version] = gs.versions(guest)
    assert version.manifest.disks[0].target == "vda"


def test_a_transient_guest_whose_runner_died_mid_copy_is_created_again_by_the_next_command(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("transkill", start=False)
    xml = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    guest.dom.undefine()
    guest.conn.createXML(xml, 0)
    guest.wait_for_console("GS-READY", timeout=90)
    offset = guest.console_size()
    gs.job("transkill", [guest])

    proc = gs.popen("run", "transkill", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=kill"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert find_domain(guest.conn, guest.name) is None  # stopped, so gone from libvirt
    at_shutdown = shutdown_counter(guest, offset)

    listing = gs.cli("list", "--dest", str(gs.archive), check=True)

    assert "transient guest created again" in listing.stderr
    assert guest.is_running() and not guest.dom.isPersistent()
    assert _boot_counter(guest, offset) == at_shutdown
    assert gs.partials() == []


def test_a_shareable_disk_in_use_and_a_managed_save_are_refused_before_the_stop(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("shareable", disks=TWO_DISKS, start=False)
    _redefine(guest, "shareable", target="vdb")
    vdb = guest.disks["vdb"].path
    other = guest_factory("sharer", start=False)
    _redefine(
        other,
        "add",
        f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source file='{vdb}'/><target dev='vdc' bus='virtio'/><shareable/></disk>",
    )
    guest.start()
    other.start()
    before = _b3(vdb)
    offset = guest.console_size()
    gs.job("shared", [guest])
    plan = gs.cli("guests", "--job", "shared", check=True).stdout
    [vdb_line] = [line for line in plan.splitlines() if line.split()[:2] == ["vdb", str(vdb)]]
    assert "refused" in vdb_line and other.name in vdb_line, plan

    result = gs.engine.run_job("shared")

    assert not result.ok
    message = result.outcomes[0].message
    assert "is shareable" in message and other.name in message, message
    assert guest.is_running() and "GS-POWEROFF" not in guest.console_text(offset)
    assert _b3(vdb) == before
    _nothing_written(gs, guest)

    saved = guest_factory("managedsave")
    saved.dom.managedSave(0)
    assert saved.dom.hasManagedSaveImage(0)
    gs.job("saved", [saved])

    refused = gs.engine.run_job("saved")

    assert not refused.ok and "managed-save image" in refused.outcomes[0].message
    assert not saved.is_running() and saved.dom.hasManagedSaveImage(0)
    _nothing_written(gs, saved)


def test_a_raw_disk_starting_with_a_qcow2_header_is_backed_up_and_restored_as_raw(
    gs: GS, guest_factory: GuestFactory, tmp_path: Path
) -> None:
    guest = guest_factory("rawmagic", disks=TWO_DISKS, start=False)
    vdb = guest.disks["vdb"].path
    header = tmp_path / "header.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "/nowhere.qcow2", "-F", "qcow2",
         str(header), "1G"],
        check=True,
    )  # fmt: skip
    with vdb.open("r+b") as f:
        f.write(header.read_bytes()[:4096])  # what a guest that made a qcow2 there wrote
    digest, size = _b3(vdb), vdb.stat().st_size
    offset = guest.start()
    guest.wait_for_console("GS-READY", timeout=90, after=offset)
    offset = guest.console_size()
    gs.job("raw", [guest])

    assert gs.engine.run_job("raw").ok
    at_shutdown = shutdown_counter(guest, offset)
    [version] = gs.versions(guest)
    [rec] = [r for r in version.manifest.disks if r.target == "vdb"]
    assert (rec.format, rec.virtual_size, rec.file) == ("raw", size, "vdb.raw")
    assert _b3(version.path / "vdb.raw") == digest

    clone_name = f"{guest.name}-c"
    guest_factory.adopt(clone_name)
    proc = gs.cli("restore", guest.name, "1", clone_name, check=True)
    clone = guest.conn.lookupByName(clone_name)
    clone_root = ET.fromstring(clone.XMLDesc(0))
    [disk] = [
        d for d in clone_root.findall("./devices/disk") if d.find("target[@dev='vdb']") is not None
    ]
    source, driver = disk.find("source"), disk.find("driver")
    assert source is not None and driver is not None and driver.get("type") == "raw"
    clone_vdb = Path(source.get("file", ""))
    assert _b3(clone_vdb) == digest, proc.stderr
    clone.create()
    console = clone_root.find("./devices/serial/source")
    assert console is not None
    assert boot_counter(Path(console.get("path", ""))) == at_shutdown
