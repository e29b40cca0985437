"""The restore-test clone's XML: cut off from every network, and one boot only.

Every interface gets ``<link state='down'/>``: a clone of a production server
must not answer its clients, send its mail or fight the original for its
addresses, and with new MACs it would still reach the network otherwise. A
reboot or a crash ends the clone (``on_reboot``/``on_crash`` destroy), so a kernel
that panics and reboots (``panic=N``) shows as the failure it is instead of a
clone that keeps restarting. The clone is never set to autostart.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

ONE_BOOT = ("on_reboot", "on_crash")


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
    return ET.tostring(root, encoding="unicode")


def _insert_before_devices(root: ET.Element, tag: str) -> ET.Element:
    # libvirt's schema takes on_* before <devices>; its parser accepts any order, but keep it tidy.
    element = ET.Element(tag)
    devices = root.find("devices")
    where = list(root).index(devices) if devices is not None else len(root)
    root.insert(where, element)
    return element
