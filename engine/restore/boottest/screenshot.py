"""A screenshot of the restore-test clone's display, saved beside the test's record.

libvirt's ``virDomainScreenshot`` hands the image over a stream; QEMU gives a PPM
(newer ones a PNG). Only a clone with ``<graphics>`` has a display to take. A
screenshot that cannot be taken never fails the test: it is evidence, not a sign.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt

from guestsafe.engine.archive.restore_record import SCREENSHOT_FILES
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.hypervisor.connection import Hypervisor

MAX_BYTES = 64 << 20  # a 4K display as PPM is 25 MiB; anything larger is not a screenshot


def has_display(xml: str) -> bool:
    root = ET.fromstring(xml)
    return root.find("./devices/graphics") is not None or root.find("./devices/video") is not None


def take_screenshot(hv: Hypervisor, name: str, folder: Path) -> tuple[str | None, str | None]:
    """Save clone ``name``'s screen in ``folder``: (file name, None) or (None, why not)."""
    if not has_display(hv.xml(name, inactive=False)):
        return None, None
    try:
        dom = hv.connection.lookupByName(name)
        stream = hv.connection.newStream(0)
        mime = dom.screenshot(stream, 0, 0)
        data = bytearray()

        def sink(_stream: Any, chunk: bytes, _opaque: Any) -> int:
            if len(data) + len(chunk) > MAX_BYTES:
                return -1  # aborts the stream
            data.extend(chunk)
            return len(chunk)

        stream.recvAll(sink, None)
        stream.finish()
    except libvirt.libvirtError as exc:
        return None, f"no screenshot: {exc.get_error_message() or exc}"
    file = SCREENSHOT_FILES.get(str(mime))
    if file is None:
        return None, f"no screenshot: libvirt gave an image of type {mime}"
    try:
        _remove_other_screenshots(folder, file)
        atomic_write_bytes(folder / file, bytes(data))
    except OSError as exc:
        return None, f"no screenshot saved in {folder}: {exc.strerror or exc}"
    return file, None


def _remove_other_screenshots(folder: Path, keep: str) -> None:
    # One screenshot per version: the last test's, whatever its type.
    for other in SCREENSHOT_FILES.values():
        if other != keep:
            (folder / other).unlink(missing_ok=True)
