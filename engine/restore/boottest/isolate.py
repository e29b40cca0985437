"""The restore-test clone's XML: cut off from every network, and one boot only.

Every interface gets ``<link state='down'/>``: a clone of a production server
must not answer its clients, send its mail or fight the original for its
addresses, and with new MACs it would still reach the network otherwise. A
reboot or a crash ends the clone (``on_reboot``/``on_crash`` destroy), so a kernel
that panics and reboots (``panic=N``) shows as the failure it is instead of a
clone that keeps restarting. The clone is never set to autostart.

A pty serial console that logs nowhere gets a ``<log file=...>`` beside the
clone's overlays, so the console-line sign can be read (``probes.console_file``).
This rather than reading libvirt's console stream (virDomainOpenConsole): the
log is written by libvirt's virtlogd from the clone's first byte on, whoever
reads it and when, so nothing printed before guestsafe attached is lost; it
needs no reader thread or event loop in guestsafe; it does not take the
console's single stream away from an operator's ``virsh console``; and after a
failed test it is a file the operator can read. The original's XML is not
touched: only the clone, whose files the test removes, has the log.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from guestsafe.engine.archive.names import encode_guest_name
from guestsafe.engine.restore.files import free_path

ONE_BOOT = ("on_reboot", "on_crash")
CONSOLE_LOG_SUFFIX = "-console.log"


def isolate_xml(xml: str) -> str:
    root = ET.fromstring(xml)
    for iface in root.findall("./devices/interface"):
        link = iface.find("link")
        if link is None:
            link = ET.SubElement(iface, "link")
        link.attrib.clear()
        link.set("state", "down")
    for tag in ONE_BOOT:
        element = root.find(tag)
        if element is None:
            element = _insert_before_devices(root, tag)
        element.text = "destroy"
    log_pty_console(root)
    return ET.tostring(root, encoding="unicode")


def log_pty_console(root: ET.Element) -> None:
    """Log the first pty console that logs nowhere, to a new file beside the clone's disks.

    One file: the sign reads one console (``probes.console_file``), and the test
    removes that one with the clone.
    """
    devices = root.find("devices")
    folder = _disk_folder(root)
    if devices is None or folder is None:
        return
    chosen = _first_pty(devices.findall("serial")) or _first_pty(devices.findall("console"))
    if chosen is None:
        return
    prefix = encode_guest_name(root.findtext("name") or "clone")[:160]
    path = str(free_path(folder / f"{prefix}{CONSOLE_LOG_SUFFIX}"))
    ET.SubElement(chosen, "log", file=path, append="off")
    if chosen.tag != "serial":
        return
    for console in devices.findall("console"):
        # A serial-type console is libvirt's second view of that serial port; it
        # must carry the same log, or libvirt takes the two for different devices.
        if console.get("type") == "pty" and _serial_view_of(console, chosen):
            ET.SubElement(console, "log", file=path, append="off")


def _first_pty(devs: list[ET.Element]) -> ET.Element | None:
    for dev in devs:
        if dev.get("type") == "pty" and dev.find("log") is None:
            return dev
    return None


def _serial_view_of(console: ET.Element, serial: ET.Element) -> bool:
    target, serial_target = console.find("target"), serial.find("target")
    kind = target.get("type", "serial") if target is not None else "serial"
    port = (target.get("port") if target is not None else None) or "0"
    serial_port = (serial_target.get("port") if serial_target is not None else None) or "0"
    return kind == "serial" and port == serial_port and console.find("log") is None


def _disk_folder(root: ET.Element) -> Path | None:
    # The overlays' folder: a new file there is the clone's, and is removed with it.
    for source in root.findall("./devices/disk/source"):
        if source.get("file"):
            return Path(source.get("file", "")).parent
    return None


def _insert_before_devices(root: ET.Element, tag: str) -> ET.Element:
    # libvirt's schema takes on_* before <devices>; its parser accepts any order, but keep it tidy.
    element = ET.Element(tag)
    devices = root.find("devices")
    where = list(root).index(devices) if devices is not None else len(root)
    root.insert(where, element)
    return element
