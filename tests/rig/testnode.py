"""Guests on libvirt's test driver with real disk files, for unit and console tests.

The test driver reads its guests from a node XML file. Each guest here gets real
sparse raw disk files (named by index, never by guest name), so an Engine on
``test://<node file>`` backs up, verifies and restores real bytes without QEMU.
Used by the hostile-input tests (issue 7, cases 11 to 14).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from guestsafe.engine.api import Engine
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.paths import Paths

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
RUNNING, SHUTOFF = 1, 5
MiB = 1024 * 1024

# Names libvirt's test driver accepts that a shell, a terminal, Rich or a path
# join would each misread. libvirt refuses '/', newlines and C0 controls other
# than tab in names (XML 1.0 has no way to write them), so ANSI escapes and
# "[b]x[/b]" cannot be guest names; the tests put those in archives directly.
HOSTILE_NAMES = (
    "..",
    ".",
    "-rf",
    "$(touch x)",
    "`touch y`; touch z",
    "[bold red]alarm",
    "x" * 300,
    "tab\there",
    "del\x7fc1\x85",
    "\u202eevil.exe",
    "zero\u200bwidth\u200d",
    "e\u0301\u0302\u0303combining",
    " lead and trail ",
    "quote'\"<&>",
)


@dataclass
class NodeGuest:
    name: str
    running: bool = True
    disk_mib: Sequence[int] = (4,)  # one raw disk per entry, vda, vdb, ...
    macs: Sequence[str] = ()
    extra_devices: list[ET.Element] = field(default_factory=list)


@dataclass
class DriverNode:
    root: Path
    file: Path
    disks: dict[str, list[Path]]

    @property
    def uri(self) -> str:
        return f"test://{self.file}"


def write_node(root: Path, guests: Sequence[NodeGuest]) -> DriverNode:
    """A node file under ``root`` with ``guests``, and their disk files in ``root/disks``."""
    disk_dir = root / "disks"
    disk_dir.mkdir(parents=True, exist_ok=True)
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    disks: dict[str, list[Path]] = {}
    for index, guest in enumerate(guests):
        dom = ET.SubElement(node, "domain", {"type": "test"})
        ET.SubElement(dom, "name").text = guest.name
        ET.SubElement(dom, "memory", {"unit": "MiB"}).text = "64"
        ET.SubElement(dom, "vcpu").text = "1"
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type").text = "hvm"
        devices = ET.SubElement(dom, "devices")
        paths = []
        for n, size in enumerate(guest.disk_mib):
            target = "vd" + "abcdefgh"[n]
            path = disk_dir / f"g{index}-{target}.raw"
            _make_disk(path, size * MiB, f"{index}/{target}")
            paths.append(path)
            disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
            ET.SubElement(disk, "source", {"file": str(path)})
            ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
        disks[guest.name] = paths
        for mac in guest.macs:
            iface = ET.SubElement(devices, "interface", {"type": "user"})
            ET.SubElement(iface, "mac", {"address": mac})
        devices.extend(guest.extra_devices)
        state = RUNNING if guest.running else SHUTOFF
        ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(state)
    file = root / "node.xml"
    file.write_bytes(ET.tostring(node, encoding="utf-8"))
    return DriverNode(root, file, disks)


def _make_disk(path: Path, size: int, label: str) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset in (0, size // 2):
            f.seek(offset)
            f.write(f"guestsafe test disk {label} @{offset}\n".encode() * 64)


def home_paths(home: Path) -> Paths:
    return Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")


def node_engine(node: DriverNode, home: Path) -> Engine:
    """An Engine on the node's test driver, with its config, state and logs under ``home``."""
    return Engine(uri=node.uri, paths=home_paths(home), unit_dir=home / "systemd")


def save_job(engine: Engine, name: str, guests: list[str], destination: Path, **kw: object) -> Job:
    kw.setdefault("lock_wait", 0)
    job = Job(name, guests, destination, schedule=Schedule(None), **kw)  # type: ignore[arg-type]
    engine.save_job(job)
    return job


def run_cli(
    node: DriverNode, home: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``guestsafe --connect <node> ARGS`` as a separate process, in ``cwd`` (the node root)."""
    env = {**os.environ, "GUESTSAFE_HOME": str(home)}
    env.pop("LIBVIRT_DEFAULT_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "guestsafe.tui", "--connect", node.uri, *args],
        env=env,
        cwd=cwd or node.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
