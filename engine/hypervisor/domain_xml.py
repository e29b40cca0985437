"""Domain XML facts: what guestsafe reads out of a guest's libvirt definition.

Pure parsing, no connection: the adapter in ``connection.py`` feeds it the XML
libvirt returns, and restore feeds it the ``domain.xml`` kept in a version.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import StrEnum


class GuestState(StrEnum):
    """A guest's power state as guestsafe names it (libvirt's, a little coarser)."""

    NOSTATE = "nostate"
    RUNNING = "running"  # blocked counts as running
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNKNOWN = "unknown"  # the domain could not be asked (gone, or its connection died)


# Module-level names kept for callers that compare with ``RUNNING``.
RUNNING = GuestState.RUNNING
PAUSED = GuestState.PAUSED
SHUTOFF = GuestState.SHUTOFF


@dataclass(frozen=True)
class DiskInfo:
    target: str
    source: str | None
    kind: str  # "file", "block", "network", ...
    device: str  # "disk", "cdrom", "floppy", "lun"
    format: str | None
    readonly: bool
    shareable: bool
    # <disk type='volume'>: its storage pool and volume (source is the volume's name
    # until connection.py resolves it to the file or device libvirt says it is).
    pool: str | None = None
    volume: str | None = None

    @property
    def backs_up(self) -> bool:
        """Whether a backup copies this disk by default: writable disks (a writable
        floppy image too) with a source."""
        return self.source is not None and not self.is_media

    @property
    def is_media(self) -> bool:
        """Read-only disks and CD-ROM images: recorded, copied only with include_readonly."""
        return self.readonly or self.device == "cdrom"

    def copied(self, include_readonly: bool) -> bool:
        """Whether a backup with the job's ``include_readonly`` copies this disk."""
        return self.backs_up or (include_readonly and self.source is not None)


@dataclass(frozen=True)
class InterfaceInfo:
    mac: str | None
    kind: str
    source: str | None
    model: str | None


@dataclass(frozen=True)
class TpmInfo:
    """An emulated TPM (``<backend type='emulator'>``); swtpm keeps its state on the host."""

    model: str  # tpm-tis, tpm-crb, ...
    version: str  # "2.0" or "1.2"
    source_dir: str | None  # <source type='dir' path=...>, None: libvirt's default place


@dataclass(frozen=True)
class FirmwareInfo:
    """What ``<os>`` says about the firmware: the loader and the NVRAM's template."""

    loader: str | None
    loader_type: str | None  # "pflash" or "rom"
    firmware: str | None  # <os firmware='efi'>: libvirt picks the loader itself
    nvram_template: str | None
    nvram_format: str | None  # <nvram format='qcow2'>, None: raw


@dataclass(frozen=True)
class GuestInfo:
    name: str
    uuid: str
    state: GuestState
    persistent: bool
    disks: list[DiskInfo] = field(default_factory=list)
    interfaces: list[InterfaceInfo] = field(default_factory=list)
    nvram: str | None = None
    tpms: list[TpmInfo] = field(default_factory=list)
    firmware: FirmwareInfo | None = None

    @property
    def emulated_tpm(self) -> TpmInfo | None:
        return self.tpms[0] if self.tpms else None

    @property
    def macs(self) -> list[str]:
        return [i.mac for i in self.interfaces if i.mac]


def parse_domain_xml(
    xml: str, state: GuestState = GuestState.SHUTOFF, persistent: bool = True
) -> GuestInfo:
    """Read name, UUID, disks, interfaces and NVRAM out of a domain XML."""
    root = ET.fromstring(xml)
    return GuestInfo(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        state=state,
        persistent=persistent,
        disks=[_parse_disk(d) for d in root.findall("./devices/disk")],
        interfaces=[_parse_interface(i) for i in root.findall("./devices/interface")],
        nvram=(root.findtext("./os/nvram") or None),
        tpms=[t for t in map(_parse_tpm, root.findall("./devices/tpm")) if t is not None],
        firmware=_parse_firmware(root.find("os")),
    )


def _parse_tpm(tpm: ET.Element) -> TpmInfo | None:
    backend = tpm.find("backend")
    if backend is None or backend.get("type") != "emulator":
        return None  # passthrough: the host's own TPM, nothing of the guest's to keep
    source = backend.find("source")
    return TpmInfo(
        model=tpm.get("model", "tpm-tis"),
        version=backend.get("version", "2.0"),
        source_dir=source.get("path") if source is not None else None,
    )


def _parse_firmware(os_element: ET.Element | None) -> FirmwareInfo | None:
    if os_element is None:
        return None
    loader, nvram = os_element.find("loader"), os_element.find("nvram")
    info = FirmwareInfo(
        loader=(loader.text or "").strip() or None if loader is not None else None,
        loader_type=loader.get("type") if loader is not None else None,
        firmware=os_element.get("firmware"),
        nvram_template=nvram.get("template") if nvram is not None else None,
        nvram_format=nvram.get("format") if nvram is not None else None,
    )
    return info if any(vars(info).values()) else None


def _parse_disk(disk: ET.Element) -> DiskInfo:
    source = disk.find("source")
    path = None
    if source is not None:
        path = source.get("file") or source.get("dev") or source.get("name") or source.get("volume")
        if path is None and disk.get("type") == "network":
            path = source.get("protocol")  # an nbd export without a name is still a disk
    driver = disk.find("driver")
    target = disk.find("target")
    return DiskInfo(
        target=target.get("dev", "") if target is not None else "",
        source=path,
        kind=disk.get("type", "file"),
        device=disk.get("device", "disk"),
        format=driver.get("type") if driver is not None else None,
        readonly=disk.find("readonly") is not None,
        shareable=disk.find("shareable") is not None,
        pool=source.get("pool") if source is not None else None,
        volume=source.get("volume") if source is not None else None,
    )


def _parse_interface(iface: ET.Element) -> InterfaceInfo:
    mac = iface.find("mac")
    source = iface.find("source")
    model = iface.find("model")
    src = None
    if source is not None:
        src = source.get("network") or source.get("bridge") or source.get("dev")
    return InterfaceInfo(
        mac=mac.get("address", "").lower() or None if mac is not None else None,
        kind=iface.get("type", ""),
        source=src,
        model=model.get("type") if model is not None else None,
    )
