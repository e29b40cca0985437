"""Real libvirt guests for integration tests.

A test guest is a TCG (domain type ``qemu``) machine that boots the rig's kernel
and initramfs straight from files, keeps a counter on its first disk and talks
through a serial console log. See ``guest_init`` for what it prints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from .assets import GuestAssets, build_guest_assets
from .disks import DiskFormat, DiskSpec, MiB, create_disk, read_disk_counter
from .errors import RigError
from .guest_init import AGENT_PORT
from .host import make_traversable, supports_o_direct

NAME_PREFIX = "gstest-"
RIG_NS = "urn:guestsafe:test-rig"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
READY_TIMEOUT = 90.0
POLL = 0.05

ET.register_namespace("gsrig", RIG_NS)

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def state_name(state: int) -> str:
    return _STATE_NAMES.get(state, f"state {state}")


@dataclass(frozen=True)
class GuestDisk:
    """A disk image of a test guest."""

    target: str
    fmt: DiskFormat
    path: Path
    size: int


class TestGuest:
    """A libvirt guest made by the rig, with its files and console log."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        conn: libvirt.virConnect,
        name: str,
        directory: Path,
        disks: Sequence[GuestDisk],
        macs: Sequence[str],
        nvram_path: Path | None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.directory = directory
        self.xml_path = directory / "domain.xml"
        self.console_log = directory / "console.log"
        self.disks = {disk.target: disk for disk in disks}
        self.macs = list(macs)
        self.nvram_path = nvram_path
        self.last_boot_seconds: float | None = None
        self.last_shutdown_seconds: float | None = None

    def __repr__(self) -> str:
        return f"TestGuest({self.name!r})"

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    @property
    def disk_paths(self) -> list[Path]:
        return [disk.path for disk in self.disks.values()]

    # --- console -------------------------------------------------------------

    def console_size(self) -> int:
        """Bytes in the console log so far: pass it as ``after`` to see only newer output."""
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def console_text(self, after: int = 0) -> str:
        """The console log from byte offset ``after`` on, with plain newlines."""
        try:
            with self.console_log.open("rb") as handle:
                handle.seek(after)
                data = handle.read()
        except FileNotFoundError:
            return ""
        # The guest's tty turns each newline into CRLF; "$" in patterns wants "\n".
        return data.decode(errors="replace").replace("\r\n", "\n")

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, after: int = 0
    ) -> re.Match[str]:
        """Wait until the console output after byte offset ``after`` matches pattern.

        Gives up early when the guest stops, so a dead guest fails fast with its
        console tail in the message.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console_text(after))
            if match:
                return match
            stopped = not self.is_running()
            if stopped or time.monotonic() > deadline:
                # The guest may have printed the line just before it stopped.
                match = regex.search(self.console_text(after))
                if match:
                    return match
                why = f"guest is {state_name(self.state())}" if stopped else f"{timeout:.0f} s"
                raise RigError(
                    f"{self.name}: no {regex.pattern!r} on the console ({why}); "
                    f"console tail:\n{self.console_text(after)[-2000:]}"
                )
            time.sleep(POLL)

    # --- state ---------------------------------------------------------------

    def state(self) -> int:
        """The libvirt state, a ``libvirt.VIR_DOMAIN_*`` constant."""
        return int(self.dom.state()[0])

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def wait_until_state(self, state: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.state()) != state:
            if time.monotonic() > deadline:
                raise RigError(
                    f"{self.name}: still {state_name(current)} after {timeout:.0f} s, "
                    f"expected {state_name(state)}"
                )
            time.sleep(POLL)

    def start(self, *, wait_ready: bool = True, timeout: float = READY_TIMEOUT) -> int:
        """Start the guest; return the console offset where this boot's output begins."""
        offset = self.console_size()
        began = time.monotonic()
        self.dom.create()
        if wait_ready:
            self.wait_for_console(r"^GS-READY", timeout, after=offset)
            self.last_boot_seconds = time.monotonic() - began
        return offset

    def shutdown(self, timeout: float = 30.0) -> float:
        """ACPI shutdown (as ``virsh shutdown``) and wait until shut off; return seconds."""
        began = time.monotonic()
        self.dom.shutdown()
        self.wait_until_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout)
        self.last_shutdown_seconds = time.monotonic() - began
        return self.last_shutdown_seconds

    def live_xml(self, flags: int = 0) -> str:
        return str(self.dom.XMLDesc(flags))

    # --- disks ---------------------------------------------------------------

    def read_counter(self, disk_path: Path | None = None) -> int:
        """The counter a disk file holds (default: this guest's vda), read offline.

        A disk of this guest is read only while the guest is off, so the value
        is whole; then force-share is safe and avoids spurious lock failures.
        """
        own = {disk.path: disk for disk in self.disks.values()}
        if disk_path is None:
            if "vda" not in self.disks:
                raise RigError(f"{self.name} has no vda")
            disk_path = self.disks["vda"].path
        if disk_path not in own:
            return read_disk_counter(disk_path)
        if self.is_running():
            raise RigError(f"{self.name} is running; shut it down before reading {disk_path}")
        return read_disk_counter(disk_path, own[disk_path].fmt, force_share=True)

    # --- cleanup -------------------------------------------------------------

    def destroy_and_undefine(self) -> None:
        """Power off, undefine (NVRAM included) and delete the guest's directory."""
        if not self.name.startswith(NAME_PREFIX):
            raise RigError(f"refusing to remove {self.name}: not a rig guest")
        dom = find_domain(self.conn, self.name)
        if dom is not None:
            remove_domain(dom)
        shutil.rmtree(self.directory, ignore_errors=True)
        # libvirt keeps a log per guest name; random names would pile up forever.
        for log in QEMU_LOG_DIR.glob(f"{self.name}.log*"):
            log.unlink(missing_ok=True)


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)


def remove_domain(dom: libvirt.virDomain) -> None:
    """Power a guest off and undefine it with its NVRAM, save image and snapshots."""
    persistent = dom.isPersistent()
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        # It may have stopped on its own between the check and the destroy.
        if dom.isActive():
            raise
    if persistent:  # a transient guest is gone once destroyed
        dom.undefineFlags(_UNDEFINE_FLAGS)


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The guest of that name, or None.

    Listing instead of lookupByName: a failed lookup makes libvirt's default
    error handler print to stderr, and here "not found" is a normal answer.
    """
    return next((dom for dom in conn.listAllDomains() if dom.name() == name), None)


def unique_name(label: str = "vm") -> str:
    """A guest name that marks the guest as the rig's and cannot clash."""
    suffix = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=8))
    return f"{NAME_PREFIX}{label}-{suffix}"


def make_guest(
    conn: libvirt.virConnect,
    workdir: Path,
    name: str,
    *,
    disks: Sequence[DiskSpec] = (DiskSpec("vda", "qcow2", 64 * MiB),),
    ignore_acpi: bool = False,
    start: bool = True,
    interfaces: int = 1,
    vdb_text: str | None = None,
    nvram: bool = False,
    assets: GuestAssets | None = None,
    memory_mib: int = 192,
    ready_timeout: float = READY_TIMEOUT,
    agent_channel: bool = False,
) -> TestGuest:
    """Create the disks, define the guest and (by default) start it and wait for GS-READY.

    Files go to ``workdir/<name>/``. name must start with ``gstest-`` (see
    unique_name) so nothing here can touch a guest the rig did not make.
    ``agent_channel`` adds the guest agent's virtio channel, which the guest's
    responder answers (``guest_init.AGENT_SH``).
    """
    _check_request(conn, name, disks, vdb_text)
    assets = assets or build_guest_assets()
    directory = workdir / name
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)  # mkdir's mode is cut by the umask
    disks_made = [
        GuestDisk(spec.target, spec.fmt, directory / f"{spec.target}.{spec.fmt}", spec.size)
        for spec in disks
    ]
    macs = [_random_mac() for _ in range(interfaces)]
    nvram_path = directory / "nvram.fd" if nvram else None
    guest = TestGuest(conn, name, directory, disks_made, macs, nvram_path)
    try:
        _define(
            guest,
            assets,
            vdb_text,
            ignore_acpi=ignore_acpi,
            memory_mib=memory_mib,
            agent_channel=agent_channel,
        )
        if start:
            guest.start(timeout=ready_timeout)
    except BaseException:
        # A half-made guest is still ours to remove; the caller never sees it.
        guest.destroy_and_undefine()
        raise
    return guest


def _define(
    guest: TestGuest,
    assets: GuestAssets,
    vdb_text: str | None,
    *,
    ignore_acpi: bool,
    memory_mib: int,
    agent_channel: bool,
) -> None:
    make_traversable(guest.directory)
    for disk in guest.disks.values():
        text = vdb_text if disk.target == "vdb" else None
        create_disk(disk.path, disk.fmt, disk.size, text)
    xml = domain_xml(
        guest.name,
        assets,
        list(guest.disks.values()),
        guest.macs,
        ignore_acpi=ignore_acpi,
        console_log=guest.console_log,
        nvram_path=guest.nvram_path,
        memory_mib=memory_mib,
        cache="none" if supports_o_direct(guest.directory) else "writeback",
        owner=str(guest.directory),
        agent_channel=agent_channel,
    )
    guest.xml_path.write_text(xml)
    guest.conn.defineXML(xml)


def _check_request(
    conn: libvirt.virConnect, name: str, disks: Sequence[DiskSpec], vdb_text: str | None
) -> None:
    if not name.startswith(NAME_PREFIX):
        raise ValueError(f"test guest names start with {NAME_PREFIX!r}: {name!r}")
    if find_domain(conn, name) is not None:
        raise RigError(f"a guest named {name} already exists")
    targets = [spec.target for spec in disks]
    if len(set(targets)) != len(targets) or not all(re.fullmatch(r"vd[a-p]", t) for t in targets):
        raise ValueError(f"disk targets must be distinct vda..vdp: {targets}")
    if vdb_text is not None and "vdb" not in targets:
        raise ValueError("vdb_text needs a vdb disk")


def _random_mac() -> str:
    # 52:54:00 is QEMU's prefix; the rest is random, so parallel runs do not clash.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def domain_xml(
    name: str,
    assets: GuestAssets,
    disks: Sequence[GuestDisk],
    macs: Sequence[str],
    *,
    ignore_acpi: bool,
    console_log: Path,
    nvram_path: Path | None,
    memory_mib: int,
    cache: str,
    owner: str,
    agent_channel: bool = False,
) -> str:
    """The libvirt XML of a test guest."""
    domain = ET.Element("domain", type="qemu")  # TCG: nested KVM hangs on this host
    ET.SubElement(domain, "name").text = name
    _metadata(domain, owner)
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(domain, "vcpu").text = "1"
    _os(domain, assets, nvram_path, _cmdline(len(disks), ignore_acpi))
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(domain, "clock", offset="utc")
    for event, action in (("poweroff", "destroy"), ("reboot", "restart"), ("crash", "destroy")):
        ET.SubElement(domain, f"on_{event}").text = action
    _devices(domain, disks, macs, console_log, cache)
    if agent_channel:
        _agent_channel(domain)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _cmdline(disk_count: int, ignore_acpi: bool) -> str:
    words = ["console=ttyS0", "quiet", "panic=-1", f"gs.disks={disk_count}"]
    if ignore_acpi:
        words.append("gs.acpi=0")
    return " ".join(words)


def _metadata(domain: ET.Element, owner: str) -> None:
    # Who made the guest, so a later session can remove it if this process dies.
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(
        metadata,
        f"{{{RIG_NS}}}owner",
        pid=str(os.getpid()),
        boot=boot_id(),
        directory=owner,
    )


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _os(domain: ET.Element, assets: GuestAssets, nvram_path: Path | None, cmdline: str) -> None:
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if nvram_path is not None:
        loader = ET.SubElement(os_el, "loader", readonly="yes", type="pflash")
        loader.text = str(OVMF_CODE)
        ET.SubElement(os_el, "nvram", template=str(OVMF_VARS)).text = str(nvram_path)
    # A PVH kernel boots much faster but only from SeaBIOS's direct boot.
    kernel = assets.kernel if nvram_path is None else assets.bzimage
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(assets.initramfs)
    ET.SubElement(os_el, "cmdline").text = cmdline


def _devices(
    domain: ET.Element,
    disks: Sequence[GuestDisk],
    macs: Sequence[str],
    console_log: Path,
    cache: str,
) -> None:
    devices = ET.SubElement(domain, "devices")
    for disk in disks:
        _disk(devices, disk, cache)
    for mac in macs:
        # User-mode networking needs no bridge on the host.
        interface = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(interface, "mac", address=mac)
        ET.SubElement(interface, "model", type="virtio")
    for tag, target in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        chardev = ET.SubElement(devices, tag, type="file")
        # append: a restart adds to the log, so offsets taken before it stay valid.
        ET.SubElement(chardev, "source", path=str(console_log), append="on")
        ET.SubElement(chardev, "target", target)
    # Leave out what the guest does not use; every device costs boot time under TCG.
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")


def _agent_channel(domain: ET.Element) -> None:
    # No source path: libvirt makes the socket under its own channel folder.
    devices = domain.find("devices")
    assert devices is not None
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT)


def _disk(devices: ET.Element, disk: GuestDisk, cache: str) -> None:
    element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=disk.fmt, cache=cache)
    ET.SubElement(element, "source", file=str(disk.path))
    ET.SubElement(element, "target", dev=disk.target, bus="virtio")


def owner_of(dom: libvirt.virDomain) -> dict[str, str] | None:
    """The rig's owner record of a guest, None if the rig did not make it."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, RIG_NS, 0)
    except libvirt.libvirtError:
        return None
    return dict(ET.fromstring(text).attrib)
