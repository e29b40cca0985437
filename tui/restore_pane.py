"""The Restore tab: external devices, the archive's versions, and the restore form.

A restore runs in three steps, each off the UI thread: plan it (which paths and
MACs the new guest gets), settle MAC clashes in a modal, then copy and define.

The archive comes from a job's destination or from an external device. The
engine's device watcher keeps the device list live; a new device is looked at
once for an archive (a brief read-only mount), and one that holds one joins the
Archive choices. A device is mounted read-only only while its versions are
listed, and again while a restore copies from it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Select, Static

from guestsafe.engine.api import (
    MARKER,
    Archive,
    BlockDevice,
    DevicesChanged,
    DeviceWatcher,
    Engine,
    OverwriteNotice,
    RestorePlan,
    RestoreResult,
    VersionInfo,
    escape,
    is_crash_consistent,
    short_mode_label,
    space_of,
)
from guestsafe.engine.errors import Cancelled, GuestsafeError
from guestsafe.engine.events import Event

from . import formatting as fmt
from .confirm_modal import ConfirmModal
from .devices_panel import ExternalDevicesPanel
from .file_browser import FileBrowserScreen, FileSource
from .formatting import StatusStyles
from .mac_modal import MacClashScreen
from .messages import ActivityStarted, EngineEvents, GuestsChanged, RestoreEnded
from .model import text as plain
from .model.devices import DeviceRow
from .model.reporting import BatchingReporter
from .restore_form import RestoreForm
from .styles import status_styles
from .worker_errors import ReportsWorkerErrors, background

# Allocated: what a version's files take; Unique: the part no other version shares
# (reflink), about what deleting it frees. The status line counts shared blocks once.
COLUMNS = ("Guest", "Version", "Date", "Allocated", "Unique", "Mode", "Verified", "Boot test")
# Archive choices that are devices carry this before the device's spec.
DEVICE_PREFIX = "device:"
# The archive choice's first entry: what the list holds, or that it is empty.
NO_ARCHIVES = "no job destination or device archive yet"
CHOOSE_ARCHIVE = "choose an archive"


@dataclass
class DevicesSeen(Message):
    """The devices plugged in now (from the watcher's thread)."""

    devices: list[BlockDevice]


@dataclass
class MarkersProbed(Message):
    """Devices looked at for an archive, ``has_marker`` filled in where it could be."""

    devices: list[BlockDevice]


Source = Path | str  # a destination, or a device spec


class RestorePane(ReportsWorkerErrors, Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "choose_archive", "Archive", id="restore.archive"),
        Binding("t", "restore", "Restore", id="restore.start"),
        Binding("o", "restore_over", "Over original", id="restore.over"),
        # Off the footer (it is full at 80 columns); "?" lists it with the others.
        Binding("b", "boot", "Boot now", id="restore.boot"),
        Binding("slash", "filter", "Filter", id="restore.filter"),
        Binding("f", "browse_files", "Files", id="restore.files"),
    ]

    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._versions: list[VersionInfo] = []  # the archive's, all of them
        self._unique: dict[Path, int] = {}  # version folder -> bytes no other file shares
        self._shown: list[VersionInfo] = []  # those whose guest matches the filter
        self._status = ""  # how many versions the archive holds, or why none
        self._start_restored = False  # the form's "start" box, at the last submit
        self._overwrite_devices = False  # its "overwrite" box (devices holding data)
        self._boot_now = False  # the last submit was "Boot now", not "Restore"
        self._in_use: dict[tuple[str, int], list[str]] = {}  # (guest, n) -> booted clones
        self._busy = False
        self._cancel = threading.Event()
        self._destinations: list[Path] = []
        self._devices: list[BlockDevice] = []
        # What probing found, by (node, UUID): a device is looked at once per plug-in.
        self._markers: dict[tuple[str, str], tuple[bool | None, str | None]] = {}
        self._watcher: DeviceWatcher | None = None
        self._closed = False

    def _host_names(self) -> list[str]:
        """The hosts a version can be restored to; none to choose from if jobs.toml is bad."""
        try:
            return self._engine.host_names()
        except GuestsafeError:
            return []

    def compose(self) -> ComposeResult:
        with Horizontal(id="archive-bar"):
            yield Label("Archive", classes="restore-label")
            yield Select[str]([], id="dest-select", prompt=NO_ARCHIVES, compact=True)
            yield Static("", id="archive-status")
        with Horizontal(id="filter-bar"):
            yield Label("Guest", classes="restore-label")
            yield Input(
                id="guest-filter", placeholder="type to filter by guest name (/)", compact=True
            )
        yield DataTable(id="archive-table", cursor_type="row", zebra_stripes=True)
        yield RestoreForm(hosts=self._host_names(), id="restore-form")
        yield ExternalDevicesPanel(id="devices")

    def on_mount(self) -> None:
        table = self.query_one("#archive-table", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._fill())
        self.reload()
        self._watch_devices()

    def on_unmount(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.stop()

    # --- destinations and versions ----------------------------------------

    @property
    def destination(self) -> Path | None:
        value = self.query_one("#dest-select", Select).value
        if not isinstance(value, str) or value.startswith(DEVICE_PREFIX):
            return None
        return Path(value)

    @property
    def device_spec(self) -> str | None:
        """The device chosen as the archive, as its spec (UUID=...), or None."""
        value = self.query_one("#dest-select", Select).value
        if isinstance(value, str) and value.startswith(DEVICE_PREFIX):
            return value.removeprefix(DEVICE_PREFIX)
        return None

    @property
    def source(self) -> Source | None:
        return self.destination or self.device_spec

    @background(group="restore-dests")
    def reload(self) -> None:
        """Reload the destinations (from the jobs) and the selected archive's versions."""
        destinations = self._engine.destinations()
        self.app.call_from_thread(self._set_destinations, destinations)

    def _set_destinations(self, destinations: list[Path]) -> None:
        self._destinations = destinations
        self._set_sources()
        self.load_versions()

    def _set_sources(self) -> bool:
        """Offer the destinations and the devices with an archive; True if the choice changed."""
        select: Select[str] = self.query_one("#dest-select", Select)
        current = select.value
        options = [(fmt.literal(str(d)), str(d)) for d in self._destinations]
        options += [
            (fmt.literal(_device_choice(d)), DEVICE_PREFIX + d.spec)
            for d in self._devices
            if d.has_marker
        ]
        with select.prevent(Select.Changed):
            select.prompt = CHOOSE_ARCHIVE if options else NO_ARCHIVES
            select.set_options(options)
            if current in [value for _label, value in options]:
                select.value = current
            elif self._destinations:
                # A device is only ever chosen by the operator: it means a mount.
                select.value = str(self._destinations[0])
        return select.value != current

    @on(Select.Changed, "#dest-select")
    def _destination_changed(self) -> None:
        self.load_versions()

    def load_versions(self) -> None:
        source = self.source
        if source is None:
            self._loaded([], "no archive chosen")
            return
        self._load_versions(source)

    @background(group="restore-versions")
    def _load_versions(self, source: Source) -> None:
        if isinstance(source, str):
            with self._engine.device_archive(source) as archive:
                versions = archive.versions()
                space = space_of(v.path for v in versions)
            count = f"{_counted(versions)} on the device, {_total(space.total)}"
            self.app.call_from_thread(self._loaded, versions, count, None, space.unique)
            return
        destination = source
        if not (destination / MARKER).exists():
            # No backup has run to this destination yet: nothing to list, no error.
            self.app.call_from_thread(self._loaded, [], "no backups here yet")
            return
        versions = self._engine.versions(destination)
        space = space_of(v.path for v in versions)
        count = f"{_counted(versions)}, {_total(space.total)}"
        in_use: dict[tuple[str, int], list[str]] = {}
        for record in self._engine.booted_clones():  # instant-boot clones running on one
            if record.uses(destination, record.guest):
                in_use.setdefault((record.guest, record.number), []).append(record.clone)
        self.app.call_from_thread(self._loaded, versions, count, in_use, space.unique)

    def _loaded(
        self,
        versions: list[VersionInfo],
        status: str,
        in_use: dict[tuple[str, int], list[str]] | None = None,
        unique: dict[Path, int] | None = None,
    ) -> None:
        self._versions = versions
        self._unique = unique or {}
        self._status = status
        self._in_use = in_use or {}
        self._fill()

    def _fill(self) -> None:
        table = self.query_one("#archive-table", DataTable)
        row = table.cursor_row
        table.clear()
        styles = status_styles(self.app)
        warning = f"bold {self.app.current_theme.warning or 'yellow'}"
        wanted = self.query_one("#guest-filter", Input).value.strip().casefold()
        self._shown = [v for v in self._versions if wanted in v.guest.casefold()]
        status = f"{len(self._shown)} shown of {self._status}" if wanted else self._status
        self.query_one("#archive-status", Static).update(status)
        for index, v in enumerate(self._shown):
            mode_style = warning if is_crash_consistent(v.mode) else ""
            table.add_row(
                fmt.literal(v.guest),
                Text(str(v.number), justify="right"),
                fmt.literal(plain.short_time(v.date)),
                Text(plain.size(v.size), justify="right"),
                Text(self._unique_cell(v), justify="right"),
                fmt.literal(short_mode_label(v.mode), mode_style),
                self._verified_cell(v, styles, warning),
                fmt.restore_test(v.restore_test, styles),
                key=str(index),
            )
        if self._shown:
            table.move_cursor(row=min(row, len(self._shown) - 1))

    def _unique_cell(self, version: VersionInfo) -> str:
        unique = self._unique.get(version.path)
        return "-" if unique is None else plain.size(unique)

    def _verified_cell(self, version: VersionInfo, styles: StatusStyles, warning: str) -> Text:
        cell = fmt.verified(version.verified, styles)
        clones = self._in_use.get((version.guest, version.number))
        if clones:
            cell.append(f", in use by {', '.join(sorted(clones))}", style=warning)
        return cell

    @property
    def versions(self) -> list[VersionInfo]:
        """The chosen archive's versions the table lists (those the filter lets through)."""
        return list(self._shown)

    @property
    def selected_version(self) -> VersionInfo | None:
        table = self.query_one("#archive-table", DataTable)
        if not self._shown or table.row_count == 0:
            return None
        return self._shown[min(table.cursor_row, len(self._shown) - 1)]

    @on(Input.Changed, "#guest-filter")
    def _filter_changed(self) -> None:
        self._fill()

    @on(Input.Submitted, "#guest-filter")
    def _filter_done(self) -> None:
        self.focus_table()

    def action_filter(self) -> None:
        self.query_one("#guest-filter", Input).focus()

    @on(DataTable.RowHighlighted, "#archive-table")
    def _row_highlighted(self) -> None:
        version = self.selected_version
        if version is not None:
            self.query_one(RestoreForm).prefill(version.guest, version.number)

    @on(DataTable.RowSelected, "#archive-table")
    def _row_selected(self) -> None:
        self.query_one(RestoreForm).focus_new_id()

    # --- devices -----------------------------------------------------------

    @property
    def devices(self) -> list[BlockDevice]:
        """The external devices shown, once the watcher has reported them."""
        return list(self._devices)

    @background(group="restore-devices")
    def _watch_devices(self) -> None:
        def changed(change: DevicesChanged) -> None:
            self.post_message(DevicesSeen(list(change.devices)))

        try:
            watcher = self._engine.watch_devices(changed)
        except GuestsafeError as exc:
            self.app.call_from_thread(
                self.query_one(ExternalDevicesPanel).set_problem, f"no device list: {exc.message}"
            )
            return
        self._watcher = watcher
        if self._closed:  # the pane went while the watcher started
            watcher.stop()
            return
        self.post_message(DevicesSeen(list(watcher.devices)))

    def on_devices_seen(self, message: DevicesSeen) -> None:
        self._devices = [self._with_known_marker(d) for d in message.devices]
        self._show_devices()
        unknown = [d for d in self._devices if not d.locked and _marker_key(d) not in self._markers]
        for device in unknown:
            self._markers[_marker_key(device)] = (None, None)  # looked at once, by one worker
        if unknown:
            self._probe(unknown)

    def _with_known_marker(self, device: BlockDevice) -> BlockDevice:
        if device.has_marker is not None:
            self._markers[_marker_key(device)] = (device.has_marker, device.archive_id)
            return device
        known = self._markers.get(_marker_key(device))
        return device.with_marker(*known) if known else device

    @background(group="restore-probe", exclusive=False)
    def _probe(self, devices: list[BlockDevice]) -> None:
        self.post_message(MarkersProbed(self._engine.probe_markers(devices)))

    def on_markers_probed(self, message: MarkersProbed) -> None:
        for device in message.devices:
            self._markers[_marker_key(device)] = (device.has_marker, device.archive_id)
        self._devices = [self._with_known_marker(d) for d in self._devices]
        self._show_devices()

    def _show_devices(self) -> None:
        self.query_one(ExternalDevicesPanel).set_devices(
            [DeviceRow.from_device(d) for d in self._devices]
        )
        if self._set_sources():  # the chosen device was unplugged
            self.load_versions()

    # --- actions -----------------------------------------------------------

    def action_browse_files(self) -> None:
        """The chosen version's files, read-only (tui/file_browser.py)."""
        source, version = self.source, self.selected_version
        if source is None or version is None:
            self.app.notify("Choose a version first.", severity="warning")
            return

        @contextmanager
        def opener() -> Iterator[FileSource]:
            with (
                self._archive(source) as archive,
                self._engine.version_files(archive, version.guest, version.number) as files,
            ):
                yield files

        title = f"{version.guest} version {version.number}"
        self.app.push_screen(FileBrowserScreen(title, opener))

    def action_choose_archive(self) -> None:
        self.query_one("#dest-select", Select).focus()

    def action_restore(self) -> None:
        self.query_one(RestoreForm).submit()

    def action_boot(self) -> None:
        """Run the version now on overlays (``guestsafe boot``) instead of copying it."""
        self.query_one(RestoreForm).submit(boot=True)

    def focus_table(self) -> None:
        self.query_one("#archive-table", DataTable).focus()

    # --- the restore itself ------------------------------------------------

    @on(RestoreForm.Submitted)
    def _submitted(self, event: RestoreForm.Submitted) -> None:
        source = self.source
        if source is None:
            self.app.notify("Choose an archive first.", severity="warning")
            return
        if self._busy:
            self.app.notify("A restore is already running.", severity="warning")
            return
        if event.boot and isinstance(source, str):
            self.app.notify(
                "Boot now needs an archive that stays mounted; restore from a device instead.",
                severity="warning",
            )
            return
        self._start_restored = event.start
        self._overwrite_devices = event.overwrite_devices
        self._boot_now = event.boot
        self._plan(
            source, event.guest, event.number, event.new_name, event.disk_targets, event.to_host
        )

    @contextmanager
    def _archive(self, source: Source) -> Iterator[Archive]:
        """The source's archive; a device stays mounted (read-only) for the block only."""
        if isinstance(source, str):
            with self._engine.device_archive(source) as archive:
                yield archive
        else:
            with nullcontext(self._engine.archive(source)) as archive:
                yield archive

    @background(group="restore-plan")
    def _plan(
        self,
        source: Source,
        guest: str,
        number: int,
        new_name: str,
        disk_targets: tuple[str, ...] = (),
        to_host: str | None = None,
    ) -> None:
        with self._archive(source) as archive:
            plan = self._engine.plan_restore(
                archive, guest, number, new_name, disk_targets=disk_targets, to_host=to_host
            )
        plan.overwrite_devices = self._overwrite_devices
        self.app.call_from_thread(self._planned, plan, source)

    def _planned(self, plan: RestorePlan, source: Source | None = None) -> None:
        if not plan.to_settle:  # no clash, and every host's MACs were read
            self._start_restore(plan, {}, source)
            return

        def settled(choices: dict[int, str] | None) -> None:
            if choices is None:
                self.app.notify("Restore cancelled.")
                return
            self._start_restore(plan, choices, source)

        self.app.push_screen(MacClashScreen(plan), settled)

    def _start_restore(
        self, plan: RestorePlan, choices: dict[int, str], source: Source | None = None
    ) -> None:
        self._busy = True
        self._cancel = threading.Event()
        verb = "boot" if self._boot_now else "restore"
        title = f"{verb} {plan.version.guest} version {plan.version.number} as {plan.new_name}"
        self.post_message(ActivityStarted(title))
        self._restore(plan, choices, self._cancel, source)

    @background(group="restore-run")
    def _restore(
        self,
        plan: RestorePlan,
        choices: dict[int, str],
        cancel: threading.Event,
        source: Source | None = None,
    ) -> None:
        def deliver(events: list[Event]) -> None:
            self.post_message(EngineEvents(events))

        reporter = BatchingReporter(deliver)
        try:
            if self._boot_now:
                result = self._engine.boot(
                    plan, mac_choices=choices, reporter=reporter, cancel=cancel
                )
            elif isinstance(source, str):
                result = self._restore_from_device(source, plan, choices, reporter, cancel)
            else:
                result = self._engine.restore(
                    plan,
                    mac_choices=choices,
                    start=self._start_restored,
                    reporter=reporter,
                    cancel=cancel,
                )
        finally:
            reporter.flush()
            self.app.call_from_thread(self._finished)
        remarks = result.warnings + result.notes
        self.app.notify(
            restore_summary(result, booted=self._boot_now),
            severity="warning" if remarks else "information",
            # Long enough to read what the clone lost or got instead.
            timeout=10 + 4 * len(remarks) if remarks else None,
            markup=False,
        )
        self.post_message(GuestsChanged())
        if self._boot_now:
            self.app.call_from_thread(self.load_versions)  # shows "in use by" the clone

    def _restore_from_device(
        self,
        spec: str,
        plan: RestorePlan,
        choices: dict[int, str],
        reporter: BatchingReporter,
        cancel: threading.Event,
    ) -> RestoreResult:
        """Mount the device again for the copy; the plan's paths were in the last mount."""
        with self._engine.device_archive(spec) as archive:
            version = plan.version
            devices = [f"{disk}={dev}" for disk, dev in plan.device_targets.items()]
            fresh = self._engine.plan_restore(
                archive, version.guest, version.number, plan.new_name, disk_targets=devices
            )
            fresh.interfaces = plan.interfaces  # the MACs the operator was shown
            fresh.overwrite_devices = plan.overwrite_devices
            return self._engine.restore(
                fresh,
                mac_choices=choices,
                start=self._start_restored,
                reporter=reporter,
                cancel=cancel,
            )

    # --- restore over the original ----------------------------------------

    def action_restore_over(self) -> None:
        source, version = self.source, self.selected_version
        if source is None or version is None:
            self.app.notify("Choose a version first.", severity="warning")
            return
        if self._busy:
            self.app.notify("A restore is already running.", severity="warning")
            return
        self._busy = True
        self._cancel = threading.Event()
        self.post_message(
            ActivityStarted(f"restore {version.guest} version {version.number} over the original")
        )
        self._restore_over(source, version.guest, version.number, self._cancel)

    @background(group="restore-run")
    def _restore_over(
        self, source: Source, guest: str, number: int, cancel: threading.Event
    ) -> None:
        def deliver(events: list[Event]) -> None:
            self.post_message(EngineEvents(events))

        reporter = BatchingReporter(deliver)
        try:
            with self._archive(source) as archive:
                self._engine.restore_over(
                    archive, guest, number, confirm=self._ask_over, reporter=reporter, cancel=cancel
                )
        except Cancelled as exc:
            self.app.notify(escape(str(exc.message)), markup=False)
            return
        finally:
            reporter.flush()
            self.app.call_from_thread(self._finished)
        self.app.notify(
            f"restore successful: {escape(guest)} has version {number} again", markup=False
        )
        self.post_message(GuestsChanged())

    def _ask_over(self, notice: OverwriteNotice) -> bool:
        """Asked from the worker once every check passed, before anything is written."""
        answers: list[bool] = []
        answered = threading.Event()

        def settle(yes: bool | None) -> None:
            answers.append(bool(yes))
            answered.set()

        # The console deletes the replaced files after success; the CLI can keep them.
        detail = "\n".join(notice.lines()[1:])
        question = f"Restore version {notice.number} over {notice.guest}?"
        self.app.call_from_thread(
            self.app.push_screen, ConfirmModal(question, detail, yes="Replace"), settle
        )
        while not answered.wait(0.2):
            if self._cancel.is_set() or self._closed:
                return False  # cancelled or closing: nothing was changed
        return answers[0]

    def _finished(self) -> None:
        self._busy = False
        self.post_message(RestoreEnded())

    def cancel(self) -> None:
        """Ask a running restore to stop; it removes what it copied."""
        self._cancel.set()

    @property
    def busy(self) -> bool:
        return self._busy


def _counted(versions: list[VersionInfo]) -> str:
    return f"{len(versions)} version{'s' if len(versions) != 1 else ''}"


def _total(total: int) -> str:
    """The archive's space on the device, each block shared between versions counted once."""
    return f"{plain.size(total)} in all (blocks shared by versions counted once)"


def restore_summary(result: RestoreResult, *, booted: bool = False) -> str:
    """A finished restore in a few lines: what was defined, then each warning and device note."""
    macs = ", ".join(result.macs) or "no interfaces"
    lines = [f"restore successful: {escape(result.name)} is defined (MACs {macs})"]
    if booted:
        lines = [
            f"instant boot successful: {escape(result.name)} runs on overlays of the version "
            f"(MACs {macs}); guestsafe promote {escape(result.name)} makes it independent"
        ]
    lines += [f"warning: {escape(w)}" for w in result.warnings]
    lines += [f"note: {escape(n)}" for n in result.notes]
    return "\n".join(lines)


def _marker_key(device: BlockDevice) -> tuple[str, str]:
    return (device.node, device.uuid)


def _device_choice(device: BlockDevice) -> str:
    label = f" {device.label}" if device.label else ""
    return f"{device.node}{label} ({device.filesystem})"
