"""The clone's domain XML: the original's, with everything the two must not share
made the clone's own.

The clone is meant to run beside the original. Whatever the two would otherwise
share gets the clone's own (a new name, UUID, disk, NVRAM and log paths, socket
paths, ports, sVirt label), and whatever cannot be shared at all (a passed-through
host device) is dropped. Every device changed or dropped here gets a note, which
the restore summary shows, so nobody finds out only when the clone misbehaves.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guestsafe.engine.archive.names import encode_guest_name
from guestsafe.engine.restore.files import free_path
from guestsafe.engine.restore.plan import RestorePlan

CHAR_DEVICES = ("serial", "console", "channel", "parallel")
GRAPHICS_PORTS = ("port", "tlsPort", "websocket")

PortPicker = Callable[[str], int]


@dataclass
class CloneXml:
    xml: str
    # One line per device changed or dropped, for the restore summary.
    notes: list[str] = field(default_factory=list)


def free_tcp_port(host: str) -> int:
    """A TCP port nothing listens on now at ``host`` (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def rewrite_clone_xml(plan: RestorePlan, new_uuid: str, macs: list[str]) -> str:
    return build_clone_xml(plan, new_uuid, macs).xml


def build_clone_xml(
    plan: RestorePlan, new_uuid: str, macs: list[str], *, pick_port: PortPicker = free_tcp_port
) -> CloneXml:
    root = ET.fromstring(plan.xml)
    notes: list[str] = []
    _set_text(root, "name", plan.new_name)
    _set_text(root, "uuid", new_uuid)
    _set_sysinfo_uuid(root, new_uuid)
    _point_disks(root, plan)
    nvram = root.find("./os/nvram")
    if nvram is not None and plan.nvram is not None:
        nvram.text = str(plan.nvram[1])
    for iface, mac in zip(root.findall("./devices/interface"), macs, strict=False):
        _set_mac(iface, mac)
        target = iface.find("target")
        if target is not None:
            iface.remove(target)
    prefix = encode_guest_name(plan.new_name)[:160]
    _rewrite_char_devices(root, prefix, pick_port, notes)
    _rewrite_graphics(root, notes)
    _rewrite_seclabels(root, notes)
    _drop_host_devices(root, notes)
    tpm = plan.version.manifest.tpm
    _rewrite_tpm(root, notes, kept=tpm is not None and bool(tpm.files))
    return CloneXml(ET.tostring(root, encoding="unicode"), notes)


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


def _set_sysinfo_uuid(root: ET.Element, new_uuid: str) -> None:
    # libvirt refuses a guest whose SMBIOS UUID differs from its own ("UUID
    # mismatch"), and adopts it when <uuid> is missing: it must be the clone's.
    for entry in root.findall("./sysinfo/system/entry"):
        if entry.get("name") == "uuid":
            entry.text = new_uuid


def _point_disks(root: ET.Element, plan: RestorePlan) -> None:
    new_paths = {rec.target: dst for rec, dst in plan.disks}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        dev = target.get("dev") if target is not None else None
        if dev in new_paths and source is not None:
            # A block device, a pool's volume or a network disk comes back as a plain file,
            # unless the operator named a device for it (--disk-target).
            if disk.get("type") == "network":
                source.clear()  # protocol, export name, hosts, credentials: none apply now
                for auth in disk.findall("auth"):
                    disk.remove(auth)
            for attr in ("dev", "file", "pool", "volume", "mode"):
                source.attrib.pop(attr, None)
            if dev in plan.device_targets:  # written onto an existing block device
                source.set("dev", str(new_paths[dev]))
                disk.set("type", "block")
            else:
                source.set("file", str(new_paths[dev]))
                disk.set("type", "file")
            # The restored file's own header names its backing chain; a <backingStore>
            # kept from the original would point the clone at the original's files.
            for store in disk.findall("backingStore"):
                disk.remove(store)


def _set_mac(iface: ET.Element, mac: str) -> None:
    element = iface.find("mac")
    if element is None:
        element = ET.Element("mac")
        iface.insert(0, element)
    element.set("address", mac)


def _label(dev: ET.Element) -> str:
    """How a device reads in a note: "serial 1", "channel org.qemu.guest_agent.0"."""
    target = dev.find("target")
    if target is None:
        return dev.tag
    which = target.get("port") or target.get("name") or target.get("type")
    return f"{dev.tag} {which}" if which else dev.tag


def _own_path(old: str, prefix: str) -> str:
    path = Path(old)
    return str(free_path(path.parent / f"{prefix}-{path.name}"))


def _rewrite_char_devices(
    root: ET.Element, prefix: str, pick_port: PortPicker, notes: list[str]
) -> None:
    devices = root.find("devices")
    if devices is None:
        return
    for dev in list(devices):
        if dev.tag not in CHAR_DEVICES:
            continue
        _own_log(dev, prefix)
        source = dev.find("source")
        kind = dev.get("type")
        if source is None:
            continue
        if kind == "file" and "path" in source.attrib:
            source.set("path", _own_path(source.get("path", ""), prefix))
        elif kind == "unix":
            _own_socket(dev, source, prefix, notes)
        elif kind == "tcp" and source.get("mode") == "bind":
            _own_port(dev, source, pick_port, notes)
        elif kind == "dev":
            devices.remove(dev)
            notes.append(
                f"{_label(dev)}: dropped; it is the host's {source.get('path')}, which only "
                "one guest can use at a time"
            )


def _own_log(dev: ET.Element, prefix: str) -> None:
    # <log file=...> records a pty or socket console; QEMU cannot open one log twice.
    log = dev.find("log")
    if log is not None and log.get("file"):
        log.set("file", _own_path(log.get("file", ""), prefix))


def _own_socket(dev: ET.Element, source: ET.Element, prefix: str, notes: list[str]) -> None:
    """A socket QEMU listens on must be the clone's; one it connects to is kept as is."""
    if source.get("mode") != "bind" or "path" not in source.attrib:
        return  # mode='connect': the clone talks to the same server, a device kept
    target = dev.find("target")
    if dev.tag == "channel" and target is not None and target.get("type") == "virtio":
        del source.attrib["path"]  # libvirt makes one under the clone's own folder
        return
    old = source.get("path", "")
    source.set("path", _own_path(old, prefix))
    notes.append(f"{_label(dev)}: listens on {source.get('path')} instead of the original's {old}")


def _own_port(dev: ET.Element, source: ET.Element, pick_port: PortPicker, notes: list[str]) -> None:
    host = source.get("host") or ""  # none: QEMU listens on every address
    old = source.get("service")
    port = pick_port(host)
    source.set("service", str(port))
    notes.append(
        f"{_label(dev)}: listens on TCP {host or '*'}:{port} instead of the original's port {old}"
    )


def _rewrite_graphics(root: ET.Element, notes: list[str]) -> None:
    for graphics in root.findall("./devices/graphics"):
        kind = graphics.get("type", "graphics")
        fixed = [
            f"{a} {graphics.get(a)}" for a in GRAPHICS_PORTS if graphics.get(a) not in (None, "-1")
        ]
        if graphics.get("autoport") == "no" or fixed:
            for attr in GRAPHICS_PORTS:
                graphics.attrib.pop(attr, None)
            graphics.set("autoport", "yes")
            was = ", ".join(fixed) or "fixed ports"
            notes.append(
                f"{kind} display: gets free ports (autoport) instead of the original's {was}"
            )
        if _drop_display_socket(graphics):
            notes.append(f"{kind} display: gets its own socket instead of the original's")


def _drop_display_socket(graphics: ET.Element) -> bool:
    """Forget the display's socket path, so libvirt makes one for the clone."""
    dropped = graphics.attrib.pop("socket", None) is not None
    for listen in graphics.findall("listen"):
        if listen.get("type") == "socket" and listen.attrib.pop("socket", None) is not None:
            dropped = True
    return dropped


def _rewrite_seclabels(root: ET.Element, notes: list[str]) -> None:
    # Two guests with one static sVirt label can read each other's disks and memory.
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") != "static":
            continue
        old = seclabel.findtext("label")
        for tag in ("label", "imagelabel"):
            for element in seclabel.findall(tag):
                seclabel.remove(element)
        seclabel.set("type", "dynamic")
        seclabel.set("relabel", "yes")
        model = seclabel.get("model", "security")
        notes.append(
            f"{model} label: dynamic (a label of its own) instead of the original's static {old}"
        )


def _drop_host_devices(root: ET.Element, notes: list[str]) -> None:
    # A host device serves one guest: the clone would take it from the original.
    devices = root.find("devices")
    if devices is None:
        return
    for dev in list(devices):
        if dev.tag == "hostdev" or (dev.tag == "interface" and dev.get("type") == "hostdev"):
            devices.remove(dev)
            notes.append(f"{_describe_hostdev(dev)}: dropped; it is passed through to the original")


def _describe_hostdev(dev: ET.Element) -> str:
    if dev.tag == "interface":
        what = "network interface (hostdev)"
    else:
        what = f"host device {dev.get('type', '')}".strip()
    address = dev.find("./source/address")
    if address is not None:
        where = " ".join(f"{k}={v}" for k, v in sorted(address.attrib.items()) if k != "type")
        return f"{what} {where}".strip()
    vendor, product = dev.find("./source/vendor"), dev.find("./source/product")
    if vendor is not None and product is not None:
        return f"{what} {vendor.get('id')}:{product.get('id')}"
    path = dev.findtext("./source/block") or dev.findtext("./source/char") or ""
    return f"{what} {path}".strip()


def _rewrite_tpm(root: ET.Element, notes: list[str], *, kept: bool) -> None:
    devices = root.find("devices")
    if devices is None:
        return
    for tpm in devices.findall("tpm"):
        backend = tpm.find("backend")
        if backend is None:
            continue
        if backend.get("type") == "passthrough":
            devices.remove(tpm)
            notes.append("TPM: dropped; it is the host's TPM, passed through to the original")
            continue
        if backend.get("type") != "emulator":
            continue
        source = backend.find("source")
        if source is not None:
            backend.remove(source)  # the state goes under the clone's UUID instead
        if kept:
            notes.append(
                "TPM: a copy of the original's TPM state, under the clone's UUID: the clone "
                "shares the original's TPM identity (its keys and anything sealed to them)"
            )
        else:
            notes.append("TPM: starts empty; this version holds no TPM state")
