"""The Jobs tab: the job list, and the keys to create, edit, start or delete a job."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from guestsafe.engine.api import Engine, Job, LastResult
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
COLUMNS = ("Job", "Guests", "Keep", "Next run", "Last result", "Destination / device")


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

    def compose(self) -> ComposeResult:
        yield DataTable(id="jobs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="job-detail")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
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
        self.app.call_from_thread(self._loaded, jobs, results, timers)

    def _loaded(
        self, jobs: list[Job], results: dict[str, LastResult], timers: dict[str, str]
    ) -> None:
        self._jobs, self._results, self._timer_states = jobs, results, timers
        self._fill()

    def set_running(self, job: str | None) -> None:
        """Mark the job a run is under way for; None when the run ends."""
        self._running_job = job
        self._fill()

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        keep = self.selected
        table.clear()
        styles = status_styles(self.app)
        now = self._engine.now()
        for job in self._jobs:
            if job.name == self._running_job:
                last = Text("running...", style=styles.ok)
            else:
                last = fmt.last_result(self._results.get(job.name), styles)
            table.add_row(
                fmt.literal(job.name),
                fmt.literal(", ".join(job.guests)),
                Text(str(job.keep)),
                Text(self._next_run(job, now)),
                last,
                fmt.literal(plain.where(job)),
                key=job.name,
            )
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
        if result is None:
            text.append("\nNo run yet.")
            detail.update(text)
            return
        styles = status_styles(self.app)
        text.append("\nLast run: ")
        text.append_text(fmt.last_result(result, styles))
        for line in result.summary:
            text.append("\n  ")
            text.append_text(fmt.literal(line))
        detail.update(text)

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
            known: list[str] | None = [g.name for g in self._engine.guests()]
            problem = ""
        except GuestsafeError as exc:
            known, problem = None, exc.message
        screen = JobFormScreen(
            self._engine, job, jobs=jobs, known_guests=known, guests_problem=problem
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
