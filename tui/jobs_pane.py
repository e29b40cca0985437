"""The Jobs tab: the job list, and the keys to create, edit, start or delete a job."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from guestsafe.engine.api import (
    MARKER,
    Engine,
    Job,
    LastResult,
    describe_policy,
    retention_policy,
)
from guestsafe.engine.errors import GuestsafeError

from . import formatting as fmt
from .confirm_modal import ConfirmModal
from .job_form import JobFormScreen
from .messages import JobsChanged, StartJobRequested
from .model import text as plain
from .styles import status_styles
from .worker_errors import ReportsWorkerErrors, background

# The destination comes last: it is the longest, and on a narrow terminal it is
# the one to scroll to, not the last result.
COLUMNS = (
    "Job",
    "Guests",
    "Keep",
    "Next run",
    "Last result",
    "Took",
    "Size",
    "Destination / device",
)
# Which columns stay when the terminal is too narrow for all: the first ones
# here; the detail panel under the table says everything.
PRIORITY = ("Job", "Last result", "Guests", "Keep", "Next run", "Took", "Size")
# Long names are cut to this many cells, with an ellipsis.
MAX_WIDTH = {"Job": 18, "Guests": 22, "Destination / device": 40}
CELL_PADDING = 2  # a DataTable cell's padding, both sides together


class JobsPane(ReportsWorkerErrors, Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "new_job", "New", id="jobs.new"),
        Binding("e", "edit_job", "Edit", id="jobs.edit"),
        Binding("s", "start_job", "Start now", id="jobs.start"),
        Binding("d", "delete_job", "Delete", id="jobs.delete"),
    ]

    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._jobs: list[Job] = []
        self._results: dict[str, LastResult] = {}
        # Job name -> its timer: installed, outdated, missing or manual.
        self._timer_states: dict[str, str] = {}
        self._running_job: str | None = None
        # Job name -> bytes its guests' versions take on disk; None: not readable now.
        self._sizes: dict[str, int | None] = {}

    def compose(self) -> ComposeResult:
        yield DataTable(id="jobs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="job-detail")

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._fill())
        self.reload()

    # --- data --------------------------------------------------------------

    @property
    def jobs(self) -> list[Job]:
        """The jobs as last loaded (for the command palette)."""
        return list(self._jobs)

    @property
    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not self._jobs or table.row_count == 0:
            return None
        row = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return str(row.value) if row.value is not None else None

    @background(group="jobs-load")
    def reload(self) -> None:
        jobs = self._engine.jobs()
        results = self._engine.last_results()
        timers = self._engine.timer_states(jobs)
        sizes = {job.name: self._versions_size(job) for job in jobs}
        self.app.call_from_thread(self._loaded, jobs, results, timers, sizes)

    def _versions_size(self, job: Job) -> int | None:
        """What the job's guests' versions take on disk; None: none, or a device job."""
        if job.device or not (Path(job.destination) / MARKER).exists():
            return None  # a device is only mounted to restore or back up, not to count
        try:
            versions = self._engine.versions(job.destination)
        except GuestsafeError:
            return None
        sizes = [v.size for v in versions if v.guest in job.guests]
        return sum(sizes) if sizes else None

    def _loaded(
        self,
        jobs: list[Job],
        results: dict[str, LastResult],
        timers: dict[str, str],
        sizes: dict[str, int | None],
    ) -> None:
        self._jobs, self._results, self._timer_states = jobs, results, timers
        self._sizes = sizes
        self._fill()

    def on_resize(self) -> None:
        self._fill()

    def set_running(self, job: str | None) -> None:
        """Mark the job a run is under way for; None when the run ends."""
        self._running_job = job
        self._fill()

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        keep = self.selected if table.columns else None
        rows = [self._cells(job) for job in self._jobs]
        shown = fitting_columns(rows, self.size.width or 80)
        table.clear(columns=True)
        for column in shown:
            table.add_column(column, key=column)
        for job, cells in zip(self._jobs, rows, strict=True):
            table.add_row(*(cells[column] for column in shown), key=job.name)
        if not self._jobs:
            where = self._engine.paths.config_file
            self.query_one("#job-detail", Static).update(
                fmt.literal(f"No jobs yet in {where}. Press n to create one.")
            )
            return
        names = [job.name for job in self._jobs]
        if keep in names:
            table.move_cursor(row=names.index(keep))
        self._show_detail()

    def _cells(self, job: Job) -> dict[str, Text]:
        styles = status_styles(self.app)
        result = self._results.get(job.name)
        if job.name == self._running_job:
            last = Text("running...", style=styles.ok)
        else:
            last = fmt.last_result(result, styles)
        seconds = result.seconds if result is not None else None
        size = self._sizes.get(job.name)
        return {
            "Job": _cut(fmt.literal(job.name), "Job"),
            "Guests": _cut(fmt.literal(", ".join(job.guests)), "Guests"),
            "Keep": Text(plain.keep_summary(job)),
            "Next run": Text(self._next_run(job, self._engine.now())),
            "Last result": last,
            "Took": Text(plain.duration(seconds) if seconds is not None else "-", justify="right"),
            "Size": Text(plain.size(size) if size is not None else "-", justify="right"),
            "Destination / device": _cut(fmt.literal(plain.where(job)), "Destination / device"),
        }

    def _next_run(self, job: Job, now: datetime) -> str:
        return plain.next_run(self._engine.next_run(job), self._timer_states.get(job.name), now)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_edit_job()

    def _show_detail(self) -> None:
        name = self.selected
        detail = self.query_one("#job-detail", Static)
        result = self._results.get(name) if name is not None else None
        job = next((j for j in self._jobs if j.name == name), None)
        if name is None or job is None:
            detail.update(Text(""))
            return
        when = self._engine.next_run(job)
        text = fmt.literal(plain.schedule_detail(job, when, self._timer_states.get(name)))
        text.append("\n")
        text.append_text(fmt.literal(self._where_detail(job)))
        if result is None:
            text.append("\nNo run yet.")
            detail.update(text)
            return
        styles = status_styles(self.app)
        text.append("\nLast run: ")
        text.append_text(fmt.last_result(result, styles))
        if result.seconds is not None:
            text.append(f", took {plain.duration(result.seconds)}")
        for line in result.summary:
            text.append("\n  ")
            text.append_text(fmt.literal(line))
        detail.update(text)

    def _where_detail(self, job: Job) -> str:
        """The destination in full, the retention and what the versions take."""
        size = self._sizes.get(job.name)
        if size is not None:
            on_disk = f"versions {plain.size(size)} on disk"
        else:
            on_disk = "device: not counted" if job.device else "no versions yet"
        guests = ", ".join(job.guests)
        policy = describe_policy(retention_policy(job))
        return f"{guests} to {plain.where(job)}; {policy}; {on_disk}"

    # --- actions -----------------------------------------------------------

    def action_new_job(self) -> None:
        self._open_form(None)

    def action_edit_job(self) -> None:
        name = self.selected
        if name is None:
            self.app.notify("No job selected.", severity="warning")
            return
        self._open_form(name)

    @background(group="jobs-form")
    def _open_form(self, name: str | None) -> None:
        jobs = self._engine.jobs()
        job = next((j for j in jobs if j.name == name), None) if name is not None else None
        try:
            listed = self._engine.guests()
            known: list[str] | None = [g.name for g in listed]
            persistent: list[str] | None = [g.name for g in listed if g.persistent]
            problem = ""
        except GuestsafeError as exc:
            known, persistent, problem = None, None, exc.message
        try:
            hosts = self._engine.host_names()
        except GuestsafeError:
            hosts = []  # a broken [hosts] table: the form's save names it
        screen = JobFormScreen(
            self._engine,
            job,
            jobs=jobs,
            known_guests=known,
            guests_problem=problem,
            persistent_guests=persistent,
            hosts=hosts,
        )
        self.app.call_from_thread(self.app.push_screen, screen, self._form_closed)

    def _form_closed(self, saved: str | None) -> None:
        if saved is None:
            return
        self.app.notify(f"Saved job {saved}.", markup=False)
        self.post_message(JobsChanged())
        self.reload()

    def action_start_job(self) -> None:
        name = self.selected
        if name is None:
            self.app.notify("No job selected.", severity="warning")
            return
        self.post_message(StartJobRequested(name))

    def action_delete_job(self) -> None:
        name = self.selected
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._delete(name)

        question = f"Delete job {name}?"
        detail = "Its backups stay on disk; only the job is removed."
        self.app.push_screen(ConfirmModal(question, detail, yes="Delete"), answered)

    @background(group="jobs-delete")
    def _delete(self, name: str) -> None:
        self._engine.delete_job(name)
        self.app.call_from_thread(self._deleted, name)

    def _deleted(self, name: str) -> None:
        self.app.notify(f"Deleted job {name}.", markup=False)
        self.post_message(JobsChanged())
        self.reload()

    def focus_table(self) -> None:
        self.query_one(DataTable).focus()


def _cut(text: Text, column: str) -> Text:
    """A long name cut to its column's width with an ellipsis; the panel shows it whole."""
    text.truncate(MAX_WIDTH[column], overflow="ellipsis")
    return text


def fitting_columns(rows: list[dict[str, Text]], width: int) -> list[str]:
    """The columns that fit ``width`` cells, by ``PRIORITY``, in the table's order."""

    def needed(column: str) -> int:
        return max([len(column), *(row[column].cell_len for row in rows)]) + CELL_PADDING

    chosen: set[str] = set()
    used = 1  # the table's own edge
    for column in (*PRIORITY, *[c for c in COLUMNS if c not in PRIORITY]):
        if used + needed(column) <= width or column == "Job":
            chosen.add(column)
            used += needed(column)
    return [column for column in COLUMNS if column in chosen]
