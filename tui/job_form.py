"""Create or edit a job, with every problem shown at its field.

The form never saves a job the engine's checks refuse: it validates as the
operator types (fields they have changed; all of them once they try to save),
and if ``save_job`` still refuses, its ``FieldError``s land at the fields too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widget import Widget
from textual.widgets import (
    Button,
    Checkbox,
    Footer,
    Input,
    Label,
    RadioSet,
    Static,
)

from guestsafe.engine.api import (
    HOOK_PHASES,
    IO_CLASSES,
    MARKER,
    MODES,
    ON_TIMEOUT,
    RESTORE_TESTS,
    WEEKDAYS,
    BlockDevice,
    Engine,
    FieldError,
    Job,
    RetentionPolicy,
    device_shares,
    directory_shares,
    resolve_guests,
    sharing_note,
)
from guestsafe.engine.errors import GuestsafeError, JobConfigError

from .choice_button import ChoiceButton
from .field_input import FieldInput
from .formatting import literal
from .model.job_form import (
    CALENDAR_FIELDS,
    FIELDS,
    HOOK_FIELDS,
    MODE_HELP,
    JobFormValues,
    by_field,
    check_job,
    coverage_hint,
    device_hint,
    hook_field,
    named_device,
    next_runs_text,
    node_note,
    split_weekdays,
)
from .model.prune_preview import GuestHistory, policy_of, preview_lines
from .tick_box import TickBox
from .worker_errors import ReportsWorkerErrors, background

FORM_LEVEL = "form"  # problems that belong to no one field, shown at the top
CALENDAR_LABELS = {
    "keep_daily": "Keep daily",
    "keep_weekly": "Keep weekly",
    "keep_monthly": "Keep monthly",
    "keep_yearly": "Keep yearly",
}


class JobFormScreen(ReportsWorkerErrors, ModalScreen[str | None]):
    """Returns the saved job's name, or None when cancelled."""

    HELP_TITLE = "the job form"  # the help screen's name for it

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f2", "save", "Save", id="form.save"),
        Binding("escape", "cancel", "Cancel", id="form.cancel"),
    ]

    def __init__(
        self,
        engine: Engine,
        job: Job | None,
        *,
        jobs: Sequence[Job],
        known_guests: Sequence[str] | None,
        guests_problem: str = "",
        persistent_guests: Sequence[str] | None = None,
        hosts: Sequence[str] = (),
    ) -> None:
        super().__init__(classes="modal")
        self._engine = engine
        # The hosts jobs.toml names, "local" first; the field shows only beside another.
        self._hosts = list(hosts)
        # The form's fields as composed: Hosts only where there is a host to choose.
        self._fields = [f for f in FIELDS if f != "hosts" or len(self._hosts) > 1]
        self._original = job
        self._others = [j for j in jobs if job is None or j.name != job.name]
        self._known = list(known_guests) if known_guests is not None else None
        # The guests "all guests" covers (a transient one is in no backup).
        persistent = persistent_guests if persistent_guests is not None else known_guests
        self._persistent = list(persistent or [])
        self._guests_problem = guests_problem
        self._initial = JobFormValues.from_job(job) if job is not None else JobFormValues()
        # Editing shows every problem at once (a destination may have gone);
        # a new form waits until a field is changed or Save is pressed.
        self._show_all = job is not None
        self._detected: list[BlockDevice] = []
        self._sharing = ""  # whether versions on the destination will share blocks
        # The versions the prune preview shows; the newest load wins.
        self._histories: list[GuestHistory] = []
        self._history_load = 0

    # --- layout ------------------------------------------------------------

    def compose(self) -> ComposeResult:
        v = self._initial
        title = "New job" if self._original is None else f"Edit job {self._original.name}"
        with Vertical(id="job-form", classes="dialog"):
            yield Static(literal(title), classes="dialog-title")
            yield Static("", id="e-form", classes="field-error")
            with VerticalScroll(id="form-fields"):
                yield from self._text("name", "Name", v.name, "nightly")
                if len(self._hosts) > 1:
                    known = ", ".join(self._hosts)
                    yield from self._text("hosts", "Hosts", v.hosts, f"this machine; {known}")
                yield from self._row(
                    "all_guests",
                    "All guests",
                    TickBox("every guest defined when it runs", v.all_guests, compact=True),
                )
                yield from self._text("guests", "Guests", v.guests, "web1, db1")
                yield from self._text(
                    "exclude", "Exclude", v.exclude, "with all guests: scratch-*, test-?"
                )
                yield Static("", id="guests-hint", classes="field-hint")
                yield from self._text("destination", "Destination", v.destination, "/srv/backup")
                yield from self._text(
                    "device", "Device", v.device, "optional: /dev/sdb1, UUID=..., LABEL=..."
                )
                yield Static("", id="device-hint", classes="field-hint")
                yield Static("", id="sharing-hint", classes="field-hint")
                yield from self._text("keep", "Keep last", v.keep, "3", integer=True)
                for field, label in CALENDAR_LABELS.items():
                    yield from self._text(field, label, getattr(v, field), "0: off", integer=True)
                yield Static("", id="prune-preview", classes="field-hint")
                yield from self._text("time", "Time (HH:MM)", v.time, "empty: manual only")
                yield from self._row("weekdays", "Weekdays", self._weekday_boxes(v.weekdays))
                yield Static("", id="next-runs", classes="field-hint")
                yield from self._text(
                    "mail_to", "Mail to", v.mail_to, "empty: the [notify] recipients"
                )
                yield from self._row("mode", "Mode", self._radio_set("mode", MODES, v.mode))
                yield Static(id="mode-help", classes="field-hint")
                yield from self._row(
                    "fallback_to_stop",
                    "Fallback",
                    TickBox(
                        "copy as in stop where push backups cannot run",
                        v.fallback_to_stop,
                        compact=True,
                    ),
                )
                yield from self._row(
                    "ionice",
                    "I/O class",
                    self._radio_set("ionice", IO_CLASSES, v.ionice, horizontal=True),
                )
                yield from self._text(
                    "bwlimit", "Bandwidth limit", v.bwlimit, "100 MiB/s; empty: no limit"
                )
                yield from self._text(
                    "shutdown_timeout",
                    "Shutdown timeout",
                    v.shutdown_timeout,
                    "seconds",
                    integer=True,
                )
                yield from self._row(
                    "on_timeout",
                    "On timeout",
                    self._radio_set("on_timeout", ON_TIMEOUT, v.on_timeout, horizontal=True),
                )
                yield from self._row(
                    "verify", "Verify", TickBox("read the copy back", v.verify, compact=True)
                )
                yield from self._row(
                    "restore_test",
                    "Restore test",
                    self._radio_set("restore_test", RESTORE_TESTS, v.restore_test, horizontal=True),
                )
                yield from self._row(
                    "group",
                    "Group",
                    TickBox("stop all, copy, start in reverse", v.group, compact=True),
                )
                yield from self._text(
                    "lock_wait",
                    "Busy wait",
                    v.lock_wait,
                    "seconds to wait for a busy guest",
                    integer=True,
                )
                yield from self._hook_rows(v)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (F2)", id="form-save", variant="primary", compact=True)
                yield Button("Cancel (Esc)", id="form-cancel", compact=True)
        yield Footer()

    def _text(
        self, field: str, label: str, value: str, placeholder: str, *, integer: bool = False
    ) -> ComposeResult:
        widget = FieldInput(
            value, placeholder=placeholder, type="integer" if integer else "text", compact=True
        )
        yield from self._row(field, label, widget)

    def _hook_rows(self, v: JobFormValues) -> ComposeResult:
        yield Static(
            "Hooks: an absolute program and its arguments, run without a shell. "
            "job-start and pre-stop can veto the backup.",
            classes="field-hint",
        )
        for phase in HOOK_PHASES:
            field = hook_field(phase)
            yield from self._text(field, phase, getattr(v, field), "/usr/local/sbin/prog arg")
        yield from self._text(
            "hook_timeout", "Hook timeout", v.hook_timeout, "seconds per hook", integer=True
        )

    def _row(self, field: str, label: str, widget: Widget) -> ComposeResult:
        widget.id = f"f-{field}"
        with Horizontal(classes="form-row"):
            yield Label(label, classes="form-label")
            yield widget
        yield Static("", id=f"e-{field}", classes="field-error")

    @staticmethod
    def _radio_set(
        field: str, choices: Sequence[str], value: str, *, horizontal: bool = False
    ) -> RadioSet:
        buttons = [
            ChoiceButton(choice, value == choice, id=f"{field}-{choice}", compact=True)
            for choice in choices
        ]
        radio_set = RadioSet(*buttons, compact=True)
        if horizontal:
            radio_set.add_class("horizontal")
        return radio_set

    @staticmethod
    def _weekday_boxes(weekdays: str) -> Horizontal:
        """One box per day, as ArchivistaVM shows them; none ticked: every day."""
        chosen = set(split_weekdays(weekdays))
        boxes = [
            TickBox(day.capitalize()[:2], day in chosen, id=f"wd-{day}", compact=True)
            for day in WEEKDAYS
        ]
        return Horizontal(*boxes, classes="weekday-boxes")

    def _show_guests(self) -> None:
        """One of the guest list and exclude is in use; the hint says whom the job covers."""
        values = self.values()
        guests = self.query_one("#f-guests", Input)
        guests.disabled = values.all_guests
        # A disabled field's example would read as the guests the job takes.
        guests.placeholder = "not used with all guests" if values.all_guests else "web1, db1"
        self.query_one("#f-exclude", Input).disabled = not values.all_guests
        if self._known is None:
            text = f"guests could not be listed: {self._guests_problem}"
        elif values.all_guests:
            text = coverage_hint(values, self._persistent)
        else:
            text = "defined: " + (", ".join(self._known) or "none")
        self.query_one("#guests-hint", Static).update(literal(text))

    def on_mount(self) -> None:
        self.query_one("#f-name", Input).focus()
        self._show_guests()
        self._show_mode_help()
        self._validate()
        self._showdevice_hint()
        self._show_sharing()
        self._check_sharing()
        self._find_devices()
        self._show_next_runs()
        self._show_prune_preview()
        self._reload_history()

    # --- reading the fields ------------------------------------------------

    def values(self) -> JobFormValues:
        def text(field: str) -> str:
            return self.query_one(f"#f-{field}", Input).value

        def choice(field: str, default: str) -> str:
            pressed = self.query_one(f"#f-{field}", RadioSet).pressed_button
            if pressed is None or pressed.id is None:
                return default
            return pressed.id.removeprefix(f"{field}-")

        return JobFormValues(
            name=text("name"),
            hosts=text("hosts") if len(self._hosts) > 1 else self._initial.hosts,
            all_guests=self.query_one("#f-all_guests", Checkbox).value,
            guests=text("guests"),
            exclude=text("exclude"),
            destination=text("destination"),
            device=text("device"),
            keep=text("keep"),
            **{field: text(field) for field in CALENDAR_FIELDS},
            time=text("time"),
            weekdays=", ".join(
                day for day in WEEKDAYS if self.query_one(f"#wd-{day}", Checkbox).value
            ),
            mail_to=text("mail_to"),
            mode=choice("mode", "stop"),
            ionice=choice("ionice", "idle"),
            bwlimit=text("bwlimit"),
            shutdown_timeout=text("shutdown_timeout"),
            on_timeout=choice("on_timeout", "abort"),
            group=self.query_one("#f-group", Checkbox).value,
            verify=self.query_one("#f-verify", Checkbox).value,
            restore_test=choice("restore_test", "never"),
            fallback_to_stop=self.query_one("#f-fallback_to_stop", Checkbox).value,
            lock_wait=text("lock_wait"),
            hook_timeout=text("hook_timeout"),
            **{field: text(field) for field in HOOK_FIELDS},
        )

    def _check(self) -> tuple[Job, list[FieldError]]:
        return check_job(
            self.values(),
            existing=self._others,
            known_guests=self._known,
            base=self._original,
            known_hosts=self._hosts or None,
        )

    # --- showing problems --------------------------------------------------

    def _validate(self) -> list[FieldError]:
        _job, problems = self._check()
        self._show(problems)
        return problems

    def _show(self, problems: Sequence[FieldError], *, all_fields: bool = False) -> None:
        messages = by_field(problems)
        values = self.values()
        for field in self._fields:
            changed = getattr(values, field) != getattr(self._initial, field)
            shown = all_fields or self._show_all or changed
            message = messages.get(field, "") if shown else ""
            self._set_error(field, message)
        general = [messages[f] for f in messages if f not in self._fields]
        show_general = general and (all_fields or self._show_all)
        self._set_error(FORM_LEVEL, general[0] if show_general else "")

    def _set_error(self, field: str, message: str) -> None:
        error = self.query_one(f"#e-{field}", Static)
        error.update(literal(message))
        error.display = bool(message)
        if field != FORM_LEVEL:
            self.query_one(f"#f-{field}").set_class(bool(message), "invalid")

    def show_problems(self, problems: Sequence[FieldError]) -> None:
        """Put problems found elsewhere (the engine's save) at their fields."""
        self._show_all = True
        self._show(problems, all_fields=True)

    # --- events ------------------------------------------------------------

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def _field_changed(self, event: Input.Changed | Checkbox.Changed) -> None:
        self._validate()
        field = (event.control.id or "").removeprefix("f-")
        if field in ("keep", *CALENDAR_FIELDS):
            self._show_prune_preview()
        elif field in ("time",) or field.startswith("wd-"):
            self._show_next_runs()
            # The runs a change gives stay in sight (at 80x24 they sit at the bottom edge).
            self.query_one("#next-runs").scroll_visible(animate=False)
        elif field in ("all_guests", "guests", "exclude", "destination", "device"):
            self._show_guests()
            self._reload_history()
            if field in ("destination", "device"):
                self._check_sharing()

    # --- previews ----------------------------------------------------------

    def _show_next_runs(self) -> None:
        """The next three runs the time and weekdays give, in the host's zone."""
        job, problems = self._check()
        broken = {p.field for p in problems} & {"time", "weekdays"}
        times: list[datetime] = []
        if not broken and job.schedule.time is not None:
            when = self._engine.next_run(job)
            while when is not None and len(times) < 3:
                times.append(when)
                when = self._engine.next_run(job, when)
        text = next_runs_text(times, job.schedule.time, bool(broken))
        self.query_one("#next-runs", Static).update(literal(text))

    def _show_prune_preview(self) -> None:
        values = self.values()
        counts = {"keep": values.keep} | {f: getattr(values, f) for f in CALENDAR_FIELDS}
        lines = preview_lines(self._histories, policy_of(counts), self._engine.now())
        self.query_one("#prune-preview", Static).update(literal("\n".join(lines), multiline=True))

    def _reload_history(self) -> None:
        values = self.values()
        self._history_load += 1
        original = self._original
        same = (
            original is not None
            and values.destination.strip() == str(original.destination)
            and values.device.strip() == (original.device or "")
        )
        job, _problems = self._check()
        guests = resolve_guests(job, self._persistent)
        self._load_history(self._history_load, values.destination.strip(), guests, same)

    @background(group="form-history")
    def _load_history(self, load: int, destination: str, guests: list[str], same: bool) -> None:
        """The guests' versions in the archive; none when it is not there (a new path)."""
        histories: list[GuestHistory] = []
        try:
            if same and self._original is not None and self._original.device:
                # The edited job's device: mounted read-only for the look.
                job = self._original
                rows = self._engine.retention_preview(job)
                histories = [GuestHistory(g, [c for c, _ in r]) for g, r in rows if g in guests]
            elif destination and (Path(destination) / MARKER).exists():
                archive = self._engine.archive(Path(destination))
                histories = [
                    GuestHistory(g, [c for c, _ in archive.retention_rows(g, RetentionPolicy())])
                    for g in guests
                ]
        except (GuestsafeError, OSError):
            histories = []  # no archive to read: the preview simulates
        self.app.call_from_thread(self._history_loaded, load, histories)

    def _history_loaded(self, load: int, histories: list[GuestHistory]) -> None:
        if load != self._history_load:
            return  # the fields changed meanwhile: a newer load is on its way
        self._histories = histories
        self._show_prune_preview()

    @on(RadioSet.Changed)
    def _choice_changed(self, event: RadioSet.Changed) -> None:
        if event.radio_set.id == "f-mode":
            self._show_mode_help()
            # The chosen mode's warning (snapshot: crash-consistent) must not stay below the fold.
            self.query_one("#mode-help").scroll_visible(animate=False)
        self._validate()

    def _show_mode_help(self) -> None:
        """One line per mode, the chosen one bold; the crash-consistent one in warning colour."""
        chosen = self.values().mode
        warning = self.app.current_theme.warning or "yellow"
        lines = []
        for mode, help_line in MODE_HELP.items():
            style = warning if mode == "snapshot" else ""
            if mode == chosen:
                style = f"bold {style}".strip()
            marker = ">" if mode == chosen else " "
            lines.append(Text(f"{marker} {mode:<10} {help_line}", style=style))
        self.query_one("#mode-help", Static).update(Text("\n").join(lines))
        # Only the push modes (stop-short, snapshot) can fall back to stop.
        self.query_one("#f-fallback_to_stop", Checkbox).disabled = chosen == "stop"

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "form-save":
            self.action_save()
        else:
            self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        self._show_all = True
        job, problems = self._check()
        self._show(problems, all_fields=True)
        if problems:
            self._focus_first_error(problems)
            return
        previous = self._original.name if self._original is not None else None
        self._save(job, previous)

    def _focus_first_error(self, problems: Sequence[FieldError]) -> None:
        messages = by_field(problems)
        for field in self._fields:
            if field in messages:
                self.query_one(f"#f-{field}").focus()
                return

    @background(group="save")
    def _save(self, job: Job, previous: str | None) -> None:
        try:
            self._engine.save_job(job, previous_name=previous)
        except JobConfigError as exc:
            problems = list(exc.problems) or [FieldError(job.name, FORM_LEVEL, exc.message)]
            self.app.call_from_thread(self.show_problems, problems)
            return
        if job.device and job.device.startswith("/dev/"):
            self.app.notify(node_note(job.device, self._detected), timeout=10, markup=False)
        self.app.call_from_thread(self.dismiss, job.name)

    # --- external devices ----------------------------------------------------

    @background(group="form-devices")
    def _find_devices(self) -> None:
        try:
            found = self._engine.devices()
        except GuestsafeError:
            found = []  # no udev here: the form works without suggestions
        self.app.call_from_thread(self._devices_found, found)

    def _devices_found(self, found: list[BlockDevice]) -> None:
        self._detected = found
        names = [d.spec for d in found] + [d.node for d in found]
        names += [f"LABEL={d.label}" for d in found if d.label]
        self.query_one("#f-device", Input).suggester = SuggestFromList(names, case_sensitive=True)
        self._showdevice_hint()
        self._check_sharing()  # a device the field names may be among them now

    @on(Input.Changed, "#f-device")
    def _device_changed(self) -> None:
        self._showdevice_hint()

    def on_descendant_focus(self) -> None:
        self._showdevice_hint()  # shown while the device field has focus
        self._show_sharing()

    def on_descendant_blur(self) -> None:
        self._showdevice_hint()
        self._show_sharing()

    # --- whether versions there will share blocks (reflink) ------------------

    def _check_sharing(self) -> None:
        device_value = self.query_one("#f-device", Input).value.strip()
        destination = self.query_one("#f-destination", Input).value.strip()
        self._probe_sharing(destination, device_value, list(self._detected))

    @background(group="form-sharing")
    def _probe_sharing(
        self, destination: str, device_value: str, detected: list[BlockDevice]
    ) -> None:
        """Ask the destination (a probe file pair) or the named device's filesystem."""
        if device_value:
            device = named_device(device_value, detected)
            shares = None if device is None else device_shares(device.fstype, device.node)
            note = sharing_note(shares, device_value)
        elif destination.startswith("/"):
            note = sharing_note(directory_shares(Path(destination)), destination)
        else:
            note = ""
        self.app.call_from_thread(self._sharing_checked, note)

    def _sharing_checked(self, note: str) -> None:
        self._sharing = note
        self._show_sharing()

    def _show_sharing(self) -> None:
        """Shown while the destination or device field has focus, as the device hint is."""
        hint = self.query_one("#sharing-hint", Static)
        hint.update(literal(self._sharing))
        focused = any(self.query_one(f"#f-{f}", Input).has_focus for f in ("destination", "device"))
        hint.display = bool(self._sharing) and focused

    def _showdevice_hint(self) -> None:
        """The detected devices while the field has focus; the UUID tip for a /dev node."""
        field = self.query_one("#f-device", Input)
        value = field.value.strip()
        hint = self.query_one("#device-hint", Static)
        hint.update(literal(device_hint(value, self._detected)))
        hint.display = field.has_focus or value.startswith("/dev/")
