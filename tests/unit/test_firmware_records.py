"""The firmware facts a version records, and the restore's warning when the host lacks them."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from guestsafe.engine.archive.manifest import FirmwareRecord
from guestsafe.engine.backup.firmware import firmware_record
from guestsafe.engine.hypervisor.domain_xml import parse_domain_xml
from guestsafe.engine.restore.files import warn_missing_firmware


def _uefi_xml(nvram: Path, fmt: str = "") -> str:
    attr = f" format='{fmt}'" if fmt else ""
    return (
        "<domain><name>web1</name><os><loader readonly='yes' type='pflash'>"
        "/usr/share/OVMF/OVMF_CODE.fd</loader>"
        f"<nvram template='/usr/share/OVMF/OVMF_VARS.fd'{attr}>{nvram}</nvram></os></domain>"
    )


def test_the_nvram_format_comes_from_the_xml_or_from_qemu_img(tmp_path: Path) -> None:
    nvram = tmp_path / "web1_VARS.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(nvram), "540K"], check=True)

    probed = firmware_record(parse_domain_xml(_uefi_xml(nvram)))
    said = firmware_record(parse_domain_xml(_uefi_xml(nvram, "qcow2")))

    assert probed == FirmwareRecord(
        "/usr/share/OVMF/OVMF_CODE.fd", "pflash", None, "/usr/share/OVMF/OVMF_VARS.fd", "qcow2"
    )
    assert said == probed
    raw = tmp_path / "raw_VARS.fd"
    raw.write_bytes(b"\0" * 4096)
    assert (firmware_record(parse_domain_xml(_uefi_xml(raw))) or probed).nvram_format == "raw"
    assert firmware_record(parse_domain_xml("<domain><os><type>hvm</type></os></domain>")) is None


def _version(firmware: FirmwareRecord | None) -> Any:
    manifest = SimpleNamespace(firmware=firmware)
    return SimpleNamespace(manifest=manifest, guest="web1", number=3)


def test_restore_warns_when_the_recorded_loader_is_gone(tmp_path: Path) -> None:
    loader = tmp_path / "OVMF_CODE.fd"
    loader.write_bytes(b"code")
    present = FirmwareRecord(str(loader), "pflash", None, None, "raw")
    said: list[object] = []
    warnings: list[str] = []

    warn_missing_firmware(_version(present), said.append, "web1", warnings)
    assert warnings == [] and said == []

    gone = replace(present, loader=str(tmp_path / "gone" / "OVMF_CODE.fd"))
    warn_missing_firmware(_version(gone), said.append, "web1", warnings)
    [warning] = warnings
    assert "firmware loader" in warning and "gone/OVMF_CODE.fd" in warning and "ovmf" in warning
    assert len(said) == 1
    warn_missing_firmware(_version(None), said.append, "web1", warnings)
    assert len(warnings) == 1
