"""External devices detected but not mounted.

The Restore pane feeds it from the engine's device watcher, so the list follows
plugging and unplugging live. ``set_devices`` takes any sequence of
``DeviceRow`` (``model/devices.py``), which maps the engine's records to rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from . import formatting as fmt
from .model import text as plain
from .model.devices import DeviceRow

COLUMNS = ("Node", "Label", "Filesystem", "Size", "Model", "Bus", "Archive")
ARCHIVE_CELL = {True: "yes", False: "no", None: "?"}


class ExternalDevicesPanel(Vertical):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "External devices"
        self._devices: list[DeviceRow] = []

    def compose(self) -> ComposeResult:
        yield Static("no external devices detected", id="devices-empty")
        yield DataTable(id="devices-table", cursor_type="row", show_cursor=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.set_devices([])

    @property
    def devices(self) -> list[DeviceRow]:
        return list(self._devices)

    def set_devices(self, devices: Sequence[DeviceRow]) -> None:
        self._devices = list(devices)
        table = self.query_one(DataTable)
        table.clear()
        for dev in self._devices:
            table.add_row(
                fmt.literal(dev.node),
                fmt.literal(dev.label or "-"),
                fmt.literal(dev.filesystem or "-"),
                plain.size(dev.size),
                fmt.literal(dev.model or "-"),
                fmt.literal(dev.bus or "-"),
                ARCHIVE_CELL[dev.archive],
                key=dev.node,
            )
        table.display = bool(self._devices)
        self.query_one("#devices-empty", Static).display = not self._devices

    def set_problem(self, message: str) -> None:
        """Say why there is no list (no udev here), in place of the empty note."""
        self.query_one("#devices-empty", Static).update(fmt.literal(message))
