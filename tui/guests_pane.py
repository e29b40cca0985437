"""The Guests tab: the hypervisor's guests, their state, disks and MACs."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from guestsafe.engine.api import DiskPlan, Engine, GuestInfo

from . import formatting as fmt
from .model.coverage import Coverage, coverage
from .worker_errors import ReportsWorkerErrors, background

COLUMNS = ("Guest", "State", "Disks backed up", "MACs", "Jobs")
# Per disk of every guest: what the first job backing it up (else mode stop) does with it.
PLAN_COLUMNS = ("Guest", "Disk", "Source", "Backup")


class GuestsPane(ReportsWorkerErrors, Vertical):
    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._guests: list[GuestInfo] = []

    def compose(self) -> ComposeResult:
        yield DataTable(id="guests-table", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="guest-disks-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#guests-table", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        plans = self.query_one("#guest-disks-table", DataTable)
        for column in PLAN_COLUMNS:
            plans.add_column(column, key=column)
        self.reload()

    @property
    def guests(self) -> list[GuestInfo]:
        return list(self._guests)

    @background(group="guests-load")
    def reload(self) -> None:
        guests = self._engine.guests()
        covered = coverage(self._engine.jobs(), guests)
        plans = {g.name: self._engine.disk_plans(g, covered[g.name].first) for g in guests}
        self.app.call_from_thread(self._loaded, guests, plans, covered)

    def _loaded(
        self,
        guests: list[GuestInfo],
        plans: dict[str, list[DiskPlan]],
        covered: dict[str, Coverage],
    ) -> None:
        self._guests = guests
        self._show_plans(guests, plans)
        table = self.query_one("#guests-table", DataTable)
        table.clear()
        for guest in guests:
            disks = ", ".join(d.target for d in guest.disks if d.backs_up) or "-"
            table.add_row(
                fmt.literal(guest.name),
                fmt.literal(guest.state),
                fmt.literal(disks),
                fmt.literal(", ".join(guest.macs) or "-"),
                self._jobs_cell(covered[guest.name]),
                key=guest.uuid or guest.name,
            )

    def _show_plans(self, guests: list[GuestInfo], plans: dict[str, list[DiskPlan]]) -> None:
        table = self.query_one("#guest-disks-table", DataTable)
        table.clear()
        for guest in guests:
            for n, plan in enumerate(plans.get(guest.name, [])):
                how = plan.how + (f": {plan.reason}" if plan.reason else "")
                table.add_row(
                    fmt.literal(guest.name),
                    fmt.literal(plan.target),
                    fmt.literal(plan.source or "-"),
                    fmt.literal(how),
                    key=f"{guest.uuid or guest.name}/{n}",
                )

    @staticmethod
    def _jobs_cell(covered: Coverage) -> Text:
        # Bold as well as red: a new guest without backups must show in a plain terminal.
        style = "bold red" if covered.uncovered else ""
        return fmt.literal(covered.label, style)

    def focus_table(self) -> None:
        self.query_one("#guests-table", DataTable).focus()
