"""The demo sandbox: sample guests on libvirt's test driver, with real disk files.

``guestsafe --demo`` needs neither root nor a hypervisor. libvirt's test driver
reads its guests from a node XML file; their disks are real sparse files in
the sandbox, so backup, verify and restore copy real bytes. The test driver
keeps its state in memory per connection, so ``save_state`` writes the guests
back to the node file after each command: a clone restored by one command is
there for the next.

A ``Sandbox`` is also the engine's site in demo mode (``api.Site``): it names the
hypervisor, offers one make-believe USB disk holding the sandbox's archive, and
writes the guests back when the engine closes its connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt

from guestsafe.engine.archive.store import Archive
from guestsafe.engine.devices.udev import BlockDevice
from guestsafe.engine.devices.watch import DevicesChanged, ManualWatcher
from guestsafe.engine.errors import DeviceError
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs.jobs_file import save_jobs
from guestsafe.engine.jobs.model import Job, Schedule

DIR_ENV = "GUESTSAFE_DEMO_DIR"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
RUNSTATE_RUNNING = 1
RUNSTATE_SHUTOFF = 5
MIB = 1024 * 1024


@dataclass(frozen=True)
class DemoGuest:
    name: str
    running: bool
    disks: tuple[tuple[str, str, int], ...]  # target, format, size in MiB
    macs: tuple[str, ...]


GUESTS = (
    DemoGuest("web1", True, (("vda", "qcow2", 256),), ("52:54:00:10:00:01",)),
    DemoGuest("db1", True, (("vda", "raw", 512), ("vdb", "raw", 256)), ("52:54:00:10:00:02",)),
    DemoGuest("mail", False, (("vda", "raw", 128),), ("52:54:00:10:00:03", "52:54:00:10:00:04")),
)


@dataclass(frozen=True)
class Sandbox:
    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def node_file(self) -> Path:
        return self.root / "node.xml"

    @property
    def disk_dir(self) -> Path:
        return self.root / "disks"

    @property
    def archive_dir(self) -> Path:
        return self.root / "archive"

    @property
    def uri(self) -> str:
        return f"test://{self.node_file}"

    # --- the engine's site (api.Site) ------------------------------------------

    def free_devices(self, hv: Callable[[], Hypervisor]) -> list[BlockDevice]:
        return devices()

    def probe_markers(self, found: list[BlockDevice], state_dir: Path) -> list[BlockDevice]:
        return found  # the demo device says it holds an archive; nothing to mount

    def watch_devices(
        self, callback: Callable[[DevicesChanged], None], hv: Callable[[], Hypervisor]
    ) -> ManualWatcher:
        return ManualWatcher(callback, devices()).start()

    def device_archive(self, spec: str, state_dir: Path) -> AbstractContextManager[Archive]:
        return _archive_at(device_root(self, spec))

    def closing(self, hv: Hypervisor) -> None:
        save_state(self, hv.connection)


@contextmanager
def _archive_at(root: Path) -> Iterator[Archive]:
    # Nothing is mounted: the engine reads the archive folder in the device's place.
    yield Archive.open(root)


def default_root() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"guestsafe-demo-{os.getuid()}"


def ensure_sandbox(root: Path | None = None) -> Sandbox:
    """Build the sandbox once; later calls reuse it as the last command left it."""
    sandbox = Sandbox(root or default_root())
    if sandbox.node_file.exists():
        return sandbox
    for directory in (sandbox.root, sandbox.disk_dir, sandbox.archive_dir, sandbox.home):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    domains = [_domain_xml(guest, sandbox) for guest in GUESTS]
    for guest in GUESTS:
        for target, fmt, size in guest.disks:
            _make_disk(sandbox.disk_dir / f"{guest.name}-{target}.{fmt}", fmt, size * MIB)
    _write_node(sandbox, domains)
    config = sandbox.home / "config" / "jobs.toml"
    config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    save_jobs(config, _jobs(sandbox))
    return sandbox


def reset_sandbox(root: Path | None = None) -> Sandbox:
    shutil.rmtree(root or default_root(), ignore_errors=True)
    return ensure_sandbox(root)


def _jobs(sandbox: Sandbox) -> list[Job]:
    return [
        Job("nightly", ["web1", "db1"], sandbox.archive_dir, keep=3, schedule=Schedule("02:00")),
        Job(
            "mail-weekly",
            ["mail"],
            sandbox.archive_dir,
            keep=2,
            schedule=Schedule("03:30", ["sun"]),
        ),
    ]


def _make_disk(path: Path, fmt: str, size: int) -> None:
    """A sparse disk with a little recognisable data at both ends and the middle."""
    raw = path if fmt == "raw" else path.with_suffix(".tmp-raw")
    with raw.open("wb") as f:
        f.truncate(size)
        for offset in (0, size // 2, size - MIB):
            f.seek(offset)
            f.write(f"guestsafe demo {path.name} @{offset}\n".encode().ljust(MIB, b"\xa5"))
    if fmt == "raw":
        return
    if shutil.which("qemu-img"):
        subprocess.run(
            ["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True, capture_output=True
        )
        raw.unlink()
    else:
        raw.rename(path)  # without qemu-img the demo's "qcow2" stays raw inside


def _domain_xml(guest: DemoGuest, sandbox: Sandbox) -> ET.Element:
    dom = ET.Element("domain", {"type": "test"})
    ET.SubElement(dom, "name").text = guest.name
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = "512"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    for target, fmt, _size in guest.disks:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": fmt})
        ET.SubElement(
            disk, "source", {"file": str(sandbox.disk_dir / f"{guest.name}-{target}.{fmt}")}
        )
        ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    for mac in guest.macs:
        iface = ET.SubElement(devices, "interface", {"type": "user"})
        ET.SubElement(iface, "mac", {"address": mac})
        ET.SubElement(iface, "model", {"type": "virtio"})
    state = RUNSTATE_RUNNING if guest.running else RUNSTATE_SHUTOFF
    ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(state)
    return dom


def _write_node(sandbox: Sandbox, domains: list[ET.Element]) -> None:
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    node.extend(domains)
    data = ET.tostring(node, encoding="unicode").encode()
    atomic_write_bytes(sandbox.node_file, data, mode=0o600)


def save_state(sandbox: Sandbox, conn: libvirt.virConnect) -> None:
    """Write the test driver's guests, with their power state, back to the node file."""
    domains = []
    for dom in conn.listAllDomains(0):
        if not dom.isPersistent():
            continue
        element = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        running = dom.isActive()
        state = RUNSTATE_RUNNING if running else RUNSTATE_SHUTOFF
        ET.SubElement(element, f"{{{TEST_NS}}}runstate").text = str(state)
        domains.append(element)
    _write_node(sandbox, domains)


# A USB disk for the demo's Restore tab, holding the sandbox's archive. Nothing is
# mounted: the engine reads the archive folder in its place.
DEMO_DEVICE = BlockDevice(
    node="/dev/sdb1",
    name="sdb1",
    devnum=os.makedev(8, 17),
    disk_devnum=os.makedev(8, 16),
    kind="partition",
    fstype="ext4",
    fs_version="1.0",
    label="BACKUP",
    uuid="2f6c1a9e-5b3d-4c61-9a7e-0d4e8b1c2a37",
    size=1000 * 1000**3,
    vendor="WD",
    model="Elements 25A2",
    bus="usb",
    removable=False,
    read_only=False,
    locked=False,
    has_marker=True,
)


def devices() -> list[BlockDevice]:
    return [DEMO_DEVICE]


def device_root(sandbox: Sandbox, spec: str) -> Path:
    """Where the demo device ``spec`` names keeps its archive; DeviceError for any other."""
    dev = DEMO_DEVICE
    if spec not in (dev.node, dev.spec, f"LABEL={dev.label}", f"UUID={dev.uuid.upper()}"):
        raise DeviceError(f"device {spec} is not plugged in (the demo has {dev.spec} only)")
    return sandbox.archive_dir
