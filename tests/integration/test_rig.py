"""The real-guest rig itself: the guests behave as every other integration test assumes."""

from __future__ import annotations

import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from rig import (
    DiskSpec,
    GuestAssets,
    GuestFactory,
    MiB,
    TestGuest,
    make_guest,
    make_traversable,
    read_first_line,
    sweep_orphans,
)
from rig.guest import RIG_NS, find_domain

pytestmark = pytest.mark.integration

BOOT = re.compile(r"^GS-BOOT counter=(\d+)", re.MULTILINE)
POWEROFF = re.compile(r"^GS-POWEROFF counter=(\d+)", re.MULTILINE)
RecordProperty = Callable[[str, object], None]


def test_counter_survives_clean_shutdown_and_restart(
    guest_factory: GuestFactory, record_property: RecordProperty
) -> None:
    guest = guest_factory("counter")
    record_property("boot_seconds", round(guest.last_boot_seconds or 0, 2))
    assert int(guest.wait_for_console(BOOT).group(1)) == 0
    guest.wait_for_console(r"^GS-COUNTER 1$")
    time.sleep(1.0)  # several 0.2 s ticks, so the loop is shown to run, not one write

    offset = guest.console_size()
    seconds = guest.shutdown(timeout=15)
    record_property("shutdown_seconds", round(seconds, 2))
    stopped_at = int(guest.wait_for_console(POWEROFF, 5, after=offset).group(1))
    assert stopped_at >= 3
    assert seconds < 10
    assert guest.read_counter() == stopped_at

    offset = guest.start()
    assert int(guest.wait_for_console(BOOT, after=offset).group(1)) == stopped_at


def test_guest_with_acpi_off_ignores_the_power_button(guest_factory: GuestFactory) -> None:
    guest = guest_factory("noacpi", ignore_acpi=True)
    offset = guest.console_size()
    guest.dom.shutdown()
    time.sleep(5)
    assert guest.is_running()
    assert "GS-POWEROFF" not in guest.console_text(offset)


@pytest.fixture(scope="module")
def two_disk_guest(
    libvirt_conn: libvirt.virConnect,
    guest_assets: GuestAssets,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestGuest]:
    """One running guest for the read-only checks below: raw vda, qcow2 vdb, two NICs."""
    workdir = tmp_path_factory.mktemp("two-disk")
    make_traversable(workdir)
    factory = GuestFactory(libvirt_conn, workdir, guest_assets)
    yield factory(
        "disks",
        disks=(DiskSpec("vda", "raw", 16 * MiB), DiskSpec("vdb", "qcow2", 16 * MiB)),
        vdb_text="hello from vdb",
        interfaces=2,
    )
    factory.cleanup()


def test_guest_reads_the_text_put_on_vdb(two_disk_guest: TestGuest) -> None:
    assert two_disk_guest.wait_for_console(r"^GS-VDB (.*)$").group(1) == "hello from vdb"
    assert _image_format(two_disk_guest.disks["vda"].path) == "raw"
    assert _image_format(two_disk_guest.disks["vdb"].path) == "qcow2"


def test_live_xml_has_the_macs_make_guest_chose(two_disk_guest: TestGuest) -> None:
    live = ET.fromstring(two_disk_guest.live_xml())
    macs = [mac.get("address") for mac in live.findall("./devices/interface/mac")]
    assert macs == two_disk_guest.macs
    assert len(set(macs)) == 2


def test_cleanup_removes_only_its_own_guests(
    libvirt_conn: libvirt.virConnect, guest_assets: GuestAssets, workdir: Path
) -> None:
    mine = GuestFactory(libvirt_conn, workdir, guest_assets)
    theirs = GuestFactory(libvirt_conn, workdir, guest_assets)
    try:
        removed = mine("mine", start=False)
        kept = theirs("theirs", start=False)
        mine.cleanup()
        assert find_domain(libvirt_conn, removed.name) is None
        assert not removed.directory.exists()
        assert find_domain(libvirt_conn, kept.name) is not None
        assert kept.disks["vda"].path.exists()
    finally:
        mine.cleanup()
        theirs.cleanup()


def test_rig_refuses_names_that_are_not_its_own(
    libvirt_conn: libvirt.virConnect, guest_assets: GuestAssets, workdir: Path
) -> None:
    with pytest.raises(ValueError, match="gstest-"):
        make_guest(libvirt_conn, workdir, "production-db", start=False, assets=guest_assets)


def test_sweep_removes_guests_of_dead_runs_only(
    libvirt_conn: libvirt.virConnect, guest_assets: GuestAssets, workdir: Path
) -> None:
    factory = GuestFactory(libvirt_conn, workdir, guest_assets)
    try:
        orphan = factory("orphan", start=False)
        alive = factory("alive", start=False)
        _set_owner_pid(orphan, _dead_pid())
        assert orphan.name in sweep_orphans(libvirt_conn)
        assert find_domain(libvirt_conn, orphan.name) is None
        assert not orphan.directory.exists()
        assert find_domain(libvirt_conn, alive.name) is not None
    finally:
        factory.cleanup()


def test_read_first_line_of_a_fresh_qcow2_is_empty(workdir: Path) -> None:
    path = workdir / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    assert read_first_line(path) == ""


def _image_format(path: Path) -> str:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return str(json.loads(out)["format"])


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _set_owner_pid(guest: TestGuest, pid: int) -> None:
    dom = guest.dom
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    owner = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, RIG_NS, flags))
    owner.set("pid", str(pid))
    text = ET.tostring(owner, encoding="unicode")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, "gsrig", RIG_NS, flags)


def test_nvram_guest_gets_its_file_and_cleanup_removes_it(guest_factory: GuestFactory) -> None:
    # libvirt copies the template at the first start; booting OVMF under TCG to
    # GS-READY takes about 9 s more and proves nothing about the file.
    guest = guest_factory("nvram", nvram=True, start=False)
    guest.start(wait_ready=False)
    assert guest.nvram_path is not None and guest.nvram_path.stat().st_size > 0
    assert ET.fromstring(guest.live_xml()).findtext("./os/nvram") == str(guest.nvram_path)
    guest_factory.cleanup()
    assert not guest.nvram_path.exists()
