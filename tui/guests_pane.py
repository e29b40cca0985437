"""The Guests tab: the hypervisor's guests, their state, disks and MACs.

With ``[hosts.NAME]`` in jobs.toml the guests are grouped by host, each group under
a row naming the host and its state (connected, or unreachable and why); without,
this machine's guests are listed as they always were.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from guestsafe.engine.api import LOCAL_HOST, DiskPlan, Engine, GuestInfo, HostGuests, HostState

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
        jobs = self._engine.jobs()
        if self._engine.host_names() == [LOCAL_HOST]:
            guests = self._engine.guests()
            covered = coverage(jobs, guests)
            plans = {g.name: self._engine.disk_plans(g, covered[g.name].first) for g in guests}
            self.app.call_from_thread(self._loaded, guests, plans, covered)
            return
        listings = self._engine.guests_by_host()
        groups = [
            (listing, coverage(jobs, listing.guests, listing.status.name)) for listing in listings
        ]
        local, local_covered = next(
            ((g.guests, c) for g, c in groups if g.status.name == LOCAL_HOST), ([], {})
        )
        plans = {g.name: self._engine.disk_plans(g, local_covered[g.name].first) for g in local}
        self.app.call_from_thread(self._loaded_hosts, local, plans, groups)

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
            self._add_guest(table, guest, covered[guest.name], guest.uuid or guest.name)

    def _loaded_hosts(
        self,
        local: list[GuestInfo],
        plans: dict[str, list[DiskPlan]],
        groups: list[tuple[HostGuests, dict[str, Coverage]]],
    ) -> None:
        """Each host's guests under a row naming the host and its state."""
        self._guests = local
        self._show_plans(local, plans)  # disk plans: this machine's guests, as before
        table = self.query_one("#guests-table", DataTable)
        table.clear()
        for listing, covered in groups:
            status = listing.status
            connected = status.state == HostState.CONNECTED
            style = "bold" if connected else "bold red"
            state = str(status.state) + (f": {status.reason}" if status.reason else "")
            table.add_row(
                fmt.literal(f"host {status.name}", style),
                fmt.literal(state, "" if connected else "bold red"),
                fmt.literal(status.uri),
                Text(""),
                Text(""),
                key=f"host:{status.name}",
            )
            for guest in listing.guests:
                key = f"{status.name}/{guest.uuid or guest.name}"
                self._add_guest(table, guest, covered[guest.name], key, indent="  ")

    def _add_guest(
        self,
        table: DataTable[Text],
        guest: GuestInfo,
        covered: Coverage,
        key: str,
        indent: str = "",
    ) -> None:
        disks = ", ".join(d.target for d in guest.disks if d.backs_up) or "-"
        table.add_row(
            fmt.literal(indent + guest.name),
            fmt.literal(guest.state),
            fmt.literal(disks),
            fmt.literal(", ".join(guest.macs) or "-"),
            self._jobs_cell(covered),
            key=key,
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
