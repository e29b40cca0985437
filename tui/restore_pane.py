"""The Restore tab: external devices, the archive's versions, and the restore form.

A restore runs in three steps, each off the UI thread: plan it (which paths and
MACs the new guest gets), settle MAC clashes in a modal, then copy and define.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Select, Static

from ..engine.api import Engine
from ..engine.archive import MARKER, VersionInfo
from ..engine.events import Event
from ..engine.restore import RestorePlan
from . import formatting as fmt
from .devices_panel import ExternalDevicesPanel
from .mac_modal import MacClashScreen
from .messages import ActivityStarted, EngineEvents, GuestsChanged, RestoreEnded
from .reporting import BatchingReporter
from .restore_form import RestoreForm
from .styles import status_styles
from .worker_errors import ReportsWorkerErrors

COLUMNS = ("Guest", "Version", "Date", "Size", "Mode", "Verified")


class RestorePane(ReportsWorkerErrors, Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "choose_archive", "Archive", id="restore.archive"),
        Binding("t", "restore", "Restore", id="restore.start"),
    ]

    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._versions: list[VersionInfo] = []
        self._busy = False
        self._cancel = threading.Event()

    def compose(self) -> ComposeResult:
        with Horizontal(id="archive-bar"):
            yield Label("Archive", classes="restore-label")
            yield Select[str]([], id="dest-select", prompt="no job destinations", compact=True)
            yield Static("", id="archive-status")
        yield DataTable(id="archive-table", cursor_type="row", zebra_stripes=True)
        yield RestoreForm(id="restore-form")
        yield ExternalDevicesPanel(id="devices")

    def on_mount(self) -> None:
        table = self.query_one("#archive-table", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._fill())
        self.reload()

    # --- destinations and versions ----------------------------------------

    @property
    def destination(self) -> Path | None:
        value = self.query_one("#dest-select", Select).value
        return Path(value) if isinstance(value, str) else None

    @work(thread=True, exclusive=True, group="restore-dests", exit_on_error=False)
    def reload(self) -> None:
        """Reload the destinations (from the jobs) and the selected archive's versions."""
        destinations = self._engine.destinations()
        self.app.call_from_thread(self._set_destinations, destinations)

    def _set_destinations(self, destinations: list[Path]) -> None:
        select: Select[str] = self.query_one("#dest-select", Select)
        current = self.destination
        select.set_options((fmt.literal(str(d)), str(d)) for d in destinations)
        if current in destinations:
            select.value = str(current)
        elif destinations:
            select.value = str(destinations[0])
        self.load_versions()

    @on(Select.Changed, "#dest-select")
    def _destination_changed(self) -> None:
        self.load_versions()

    def load_versions(self) -> None:
        destination = self.destination
        if destination is None:
            self._loaded([], "no archive chosen")
            return
        self._load_versions(destination)

    @work(thread=True, exclusive=True, group="restore-versions", exit_on_error=False)
    def _load_versions(self, destination: Path) -> None:
        if not (destination / MARKER).exists():
            # No backup has run to this destination yet: nothing to list, no error.
            self.app.call_from_thread(self._loaded, [], "no backups here yet")
            return
        versions = self._engine.versions(destination)
        count = f"{len(versions)} version{'s' if len(versions) != 1 else ''}"
        self.app.call_from_thread(self._loaded, versions, count)

    def _loaded(self, versions: list[VersionInfo], status: str) -> None:
        self._versions = versions
        self.query_one("#archive-status", Static).update(status)
        self._fill()

    def _fill(self) -> None:
        table = self.query_one("#archive-table", DataTable)
        row = table.cursor_row
        table.clear()
        styles = status_styles(self.app)
        for index, v in enumerate(self._versions):
            table.add_row(
                fmt.literal(v.guest),
                Text(str(v.number), justify="right"),
                fmt.literal(fmt.short_time(v.date)),
                Text(fmt.size(v.size), justify="right"),
                fmt.literal(v.mode),
                fmt.verified(v.verified, styles),
                key=str(index),
            )
        if self._versions:
            table.move_cursor(row=min(row, len(self._versions) - 1))

    @property
    def selected_version(self) -> VersionInfo | None:
        table = self.query_one("#archive-table", DataTable)
        if not self._versions or table.row_count == 0:
            return None
        return self._versions[min(table.cursor_row, len(self._versions) - 1)]

    @on(DataTable.RowHighlighted, "#archive-table")
    def _row_highlighted(self) -> None:
        version = self.selected_version
        if version is not None:
            self.query_one(RestoreForm).prefill(version.guest, version.number)

    @on(DataTable.RowSelected, "#archive-table")
    def _row_selected(self) -> None:
        self.query_one(RestoreForm).focus_new_id()

    # --- actions -----------------------------------------------------------

    def action_choose_archive(self) -> None:
        self.query_one("#dest-select", Select).focus()

    def action_restore(self) -> None:
        self.query_one(RestoreForm).submit()

    def focus_table(self) -> None:
        self.query_one("#archive-table", DataTable).focus()

    # --- the restore itself ------------------------------------------------

    @on(RestoreForm.Submitted)
    def _submitted(self, event: RestoreForm.Submitted) -> None:
        destination = self.destination
        if destination is None:
            self.app.notify("Choose an archive first.", severity="warning")
            return
        if self._busy:
            self.app.notify("A restore is already running.", severity="warning")
            return
        self._plan(destination, event.guest, event.number, event.new_name)

    @work(thread=True, exclusive=True, group="restore-plan", exit_on_error=False)
    def _plan(self, destination: Path, guest: str, number: int, new_name: str) -> None:
        archive = self._engine.archive(destination)
        plan = self._engine.plan_restore(archive, guest, number, new_name)
        self.app.call_from_thread(self._planned, plan)

    def _planned(self, plan: RestorePlan) -> None:
        if not plan.clashes:
            self._start_restore(plan, {})
            return

        def settled(choices: dict[int, str] | None) -> None:
            if choices is None:
                self.app.notify("Restore cancelled.")
                return
            self._start_restore(plan, choices)

        self.app.push_screen(MacClashScreen(plan), settled)

    def _start_restore(self, plan: RestorePlan, choices: dict[int, str]) -> None:
        self._busy = True
        self._cancel = threading.Event()
        title = (
            f"restore {plan.version.guest} version {plan.version.number} as {plan.new_name}"
        )
        self.post_message(ActivityStarted(title))
        self._restore(plan, choices, self._cancel)

    @work(thread=True, exclusive=True, group="restore-run", exit_on_error=False)
    def _restore(
        self, plan: RestorePlan, choices: dict[int, str], cancel: threading.Event
    ) -> None:
        def deliver(events: list[Event]) -> None:
            self.post_message(EngineEvents(events))

        reporter = BatchingReporter(deliver)
        try:
            result = self._engine.restore(
                plan, mac_choices=choices, reporter=reporter, cancel=cancel
            )
        finally:
            reporter.flush()
            self.app.call_from_thread(self._finished)
        macs = ", ".join(result.macs) or "no interfaces"
        self.app.notify(
            f"restore successful: {result.name} is defined (MACs {macs})", markup=False
        )
        self.post_message(GuestsChanged())

    def _finished(self) -> None:
        self._busy = False
        self.post_message(RestoreEnded())

    def cancel(self) -> None:
        """Ask a running restore to stop; it removes what it copied."""
        self._cancel.set()

    @property
    def busy(self) -> bool:
        return self._busy
