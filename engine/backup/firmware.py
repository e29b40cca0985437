"""The firmware facts a version records: loader, NVRAM template, the NVRAM's format."""

from __future__ import annotations

from pathlib import Path

from guestsafe.engine.archive.manifest import FirmwareRecord
from guestsafe.engine.hypervisor.disk_checks import image_format
from guestsafe.engine.hypervisor.domain_xml import GuestInfo


def firmware_record(info: GuestInfo) -> FirmwareRecord | None:
    """What ``<os>`` names; the NVRAM's format from ``<nvram format>`` or from qemu-img.

    None for a guest whose ``<os>`` names no firmware (SeaBIOS built into QEMU).
    """
    fw = info.firmware
    if fw is None or not (fw.loader or fw.firmware or fw.nvram_template or info.nvram):
        return None
    nvram_format = fw.nvram_format
    if nvram_format is None and info.nvram and Path(info.nvram).is_file():
        nvram_format = image_format(Path(info.nvram))
    return FirmwareRecord(
        loader=fw.loader,
        loader_type=fw.loader_type,
        firmware=fw.firmware,
        nvram_template=fw.nvram_template,
        nvram_format=nvram_format,
    )
