"""The Guests tab: the hypervisor's guests, their state, disks and MACs."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from guestsafe.engine.api import Engine, GuestInfo

from . import formatting as fmt
from .worker_errors import ReportsWorkerErrors, background

COLUMNS = ("Guest", "State", "Disks backed up", "MACs")


class GuestsPane(ReportsWorkerErrors, Vertical):
    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._guests: list[GuestInfo] = []

    def compose(self) -> ComposeResult:
        yield DataTable(id="guests-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.reload()

    @property
    def guests(self) -> list[GuestInfo]:
        return list(self._guests)

    @background(group="guests-load")
    def reload(self) -> None:
        guests = self._engine.guests()
        self.app.call_from_thread(self._loaded, guests)

    def _loaded(self, guests: list[GuestInfo]) -> None:
        self._guests = guests
        table = self.query_one(DataTable)
        table.clear()
        for guest in guests:
            disks = ", ".join(d.target for d in guest.disks if d.backs_up) or "-"
            table.add_row(
                fmt.literal(guest.name),
                fmt.literal(guest.state),
                fmt.literal(disks),
                fmt.literal(", ".join(guest.macs) or "-"),
                key=guest.uuid or guest.name,
            )

    def focus_table(self) -> None:
        self.query_one(DataTable).focus()
