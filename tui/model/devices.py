"""An external device as the Restore tab's device list shows it."""

from __future__ import annotations

from dataclasses import dataclass

from guestsafe.engine.api import BlockDevice


@dataclass(frozen=True)
class DeviceRow:
    node: str
    label: str
    filesystem: str
    size: int
    model: str
    bus: str
    archive: bool | None = None  # holds a guestsafe archive; None: not known (yet)
    spec: str = ""  # how a job names it: UUID=... where it has one

    @classmethod
    def from_device(cls, dev: BlockDevice) -> DeviceRow:
        model = " ".join(part for part in (dev.vendor, dev.model) if part)
        return cls(
            dev.node, dev.label, dev.filesystem, dev.size, model, dev.bus, dev.has_marker, dev.spec
        )
