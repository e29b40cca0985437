"""The clone's domain XML: the original's, with everything the two must not share
made the clone's own."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from guestsafe.engine.archive.names import encode_guest_name
from guestsafe.engine.restore.files import free_path
from guestsafe.engine.restore.plan import RestorePlan


def rewrite_clone_xml(plan: RestorePlan, new_uuid: str, macs: list[str]) -> str:
    root = ET.fromstring(plan.xml)
    _set_text(root, "name", plan.new_name)
    _set_text(root, "uuid", new_uuid)
    new_paths = {rec.target: dst for rec, dst in plan.disks}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        dev = target.get("dev") if target is not None else None
        if dev in new_paths and source is not None:
            source.attrib.pop("dev", None)
            source.set("file", str(new_paths[dev]))
            disk.set("type", "file")
    nvram = root.find("./os/nvram")
    if nvram is not None and plan.nvram is not None:
        nvram.text = str(plan.nvram[1])
    for iface, mac in zip(root.findall("./devices/interface"), macs, strict=False):
        _set_mac(iface, mac)
        target = iface.find("target")
        if target is not None:
            iface.remove(target)
    _rewrite_char_devices(root, plan.new_name)
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


def _set_mac(iface: ET.Element, mac: str) -> None:
    element = iface.find("mac")
    if element is None:
        element = ET.Element("mac")
        iface.insert(0, element)
    element.set("address", mac)


def _rewrite_char_devices(root: ET.Element, new_name: str) -> None:
    """Give file-backed consoles their own log, and let libvirt pick socket paths."""
    prefix = encode_guest_name(new_name)[:160]
    for dev in root.findall("./devices/*"):
        if dev.tag not in ("serial", "console", "channel", "parallel"):
            continue
        source = dev.find("source")
        if source is None or "path" not in source.attrib:
            continue
        if dev.get("type") == "file":
            old = Path(source.get("path", ""))
            source.set("path", str(free_path(old.parent / f"{prefix}-{old.name}")))
        elif dev.get("type") == "unix":
            del source.attrib["path"]
