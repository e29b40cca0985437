"""The guestsafe console: Jobs, Restore, Log and Guests tabs over one engine.

The app is a thin client. Every engine call runs in a thread worker; results
and events come back as messages or through ``call_from_thread``, so widgets
are only touched on the UI thread and the console never freezes, even while a
backup copies hundreds of gigabytes.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from guestsafe import themes
from guestsafe.engine.api import Engine, RunResult, escape
from guestsafe.engine.events import Event

from .commands import GuestsafeCommands
from .confirm_modal import ConfirmModal
from .error_modal import ErrorModal
from .guests_pane import GuestsPane
from .help_screen import HelpScreen, help_rows
from .jobs_pane import JobsPane
from .log_pane import LogPane
from .messages import (
    ActivityStarted,
    CancelRunRequested,
    EngineEvents,
    GuestsChanged,
    JobsChanged,
    RestoreEnded,
    RunLogOpened,
    ShowError,
    StartJobRequested,
    SwitchTab,
)
from .model.keymap import keymap_path, load_keymap
from .restore_pane import RestorePane
from .worker_errors import ReportsWorkerErrors, background

# Tab ids, in the order shown, with their names. Each label names the key that
# opens it (after keys.toml), in letters, so a monochrome terminal shows it too.
TABS = {"jobs": "Jobs", "restore": "Restore", "log": "Log", "guests": "Guests"}


# App actions that stay out of reach while a dialog is open.
APP_ACTIONS = frozenset(
    {"show_tab", "refresh", "quit", "start_job", "new_job", "restore_selected", "follow_latest"}
)


class GuestsafeApp(ReportsWorkerErrors, App[int]):
    TITLE = "guestsafe"
    CSS = themes.stylesheet()
    COMMANDS = App.COMMANDS | {GuestsafeCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "show_tab('jobs')", "Jobs", show=False, id="app.jobs"),
        Binding("r", "show_tab('restore')", "Restore", show=False, id="app.restore"),
        Binding("l", "show_tab('log')", "Log", show=False, id="app.log"),
        Binding("g", "show_tab('guests')", "Guests", show=False, id="app.guests"),
        Binding("question_mark", "help", "Keys", id="app.help"),
        # F1 works everywhere, in a dialog and in a text field too, where ? is typed.
        Binding("f1", "help", "Keys", show=False, priority=True, id="app.help_anywhere"),
        Binding("f5", "refresh", "Refresh", id="app.refresh"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(self, engine: Engine, *, theme: str | None = None) -> None:
        super().__init__()
        for palette in themes.THEMES:
            self.register_theme(palette)
        self.theme = themes.resolve_theme(theme, self.available_themes)
        self.engine = engine
        # Read once before the console draws: a few bytes, and keys must be
        # right from the first keypress.
        self._keymap, self._keymap_problems = load_keymap(keymap_path(engine.paths.config_file))
        self.running_job: str | None = None
        self._cancel_run: threading.Event | None = None
        self._quit_when_idle = False

    # --- layout ------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="tabs", initial="jobs"):
            with TabPane(self._tab_label("jobs"), id="jobs"):
                yield JobsPane(self.engine, id="jobs-pane")
            with TabPane(self._tab_label("restore"), id="restore"):
                yield RestorePane(self.engine, id="restore-pane")
            with TabPane(self._tab_label("log"), id="log"):
                yield LogPane(self.engine, id="log-pane")
            with TabPane(self._tab_label("guests"), id="guests"):
                yield GuestsPane(self.engine, id="guests-pane")
        yield Footer()

    def _tab_label(self, tab: str) -> Content:
        """``Jobs (j)``: the tab's name and its key, as keys.toml may have moved it."""
        default = next(b.key for b in self._bindings_of_class() if b.id == f"app.{tab}")
        key = self._keymap.get(f"app.{tab}", default).split(",")[0].strip()
        return Content(f"{TABS[tab]} ({key})")  # Content: a key like "[" is no markup

    @classmethod
    def _bindings_of_class(cls) -> list[Binding]:
        return [b for b in cls.BINDINGS if isinstance(b, Binding)]

    def on_mount(self) -> None:
        self.sub_title = escape(self.engine.uri)
        if self._keymap:
            self.set_keymap(self._keymap)
        for problem in self._keymap_problems:
            self.notify(problem, title="keys.toml", severity="warning", markup=False)
        self._connect()
        self._recover()
        self.jobs_pane.focus_table()

    @property
    def jobs_pane(self) -> JobsPane:
        return self.query_one(JobsPane)

    @property
    def restore_pane(self) -> RestorePane:
        return self.query_one(RestorePane)

    @property
    def log_pane(self) -> LogPane:
        return self.query_one(LogPane)

    @property
    def guests_pane(self) -> GuestsPane:
        return self.query_one(GuestsPane)

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active

    # --- start-up ----------------------------------------------------------

    @background(group="connect")
    def _connect(self) -> None:
        host = self.engine.hostname
        self.call_from_thread(setattr, self, "title", f"guestsafe on {escape(host)}")

    @background(group="recover")
    def _recover(self) -> None:
        """Finish what an interrupted run left: restart guests it stopped, drop partials."""
        seen: list[Event] = []
        recovered = self.engine.recover(seen.append)
        if recovered:
            self.post_message(ActivityStarted("recovery after an interrupted run"))
            self.post_message(EngineEvents(seen))
            self.notify(
                "Recovered after an interrupted run: " + ", ".join(map(escape, recovered)),
                severity="warning",
                markup=False,
            )

    # --- tabs --------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # With a dialog open, the app's letter keys must not act behind it:
        # a "q" or "s" meant for the dialog would quit or start a backup.
        return not (isinstance(self.screen, ModalScreen) and action in APP_ACTIONS)

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        focus = {
            "jobs": self.jobs_pane.focus_table,
            "restore": self.restore_pane.focus_table,
            "log": self.log_pane.focus_log,
            "guests": self.guests_pane.focus_table,
        }
        focus[tab]()

    def action_help(self) -> None:
        """Every key of the screen in front, as it works now (keys.toml applied)."""
        screen = self.screen
        if isinstance(screen, HelpScreen):
            screen.dismiss(None)
            return
        rows = help_rows(screen.active_bindings, self._keymap, self.get_key_display)
        if isinstance(screen, ModalScreen):
            where = getattr(screen, "HELP_TITLE", "this dialog")
        else:
            where = f"the {TABS.get(self.active_tab, self.active_tab)} tab"
        self.push_screen(HelpScreen(f"Keys of {where}", rows))

    def on_switch_tab(self, message: SwitchTab) -> None:
        self.action_show_tab(message.tab)

    def action_refresh(self) -> None:
        self.jobs_pane.reload()
        self.restore_pane.reload()
        self.guests_pane.reload()
        self.log_pane.scan()

    # --- running a job -----------------------------------------------------

    def on_start_job_requested(self, message: StartJobRequested) -> None:
        self.action_start_job(message.job)

    def action_start_job(self, name: str | None = None) -> None:
        name = name if name is not None else self.jobs_pane.selected
        if name is None:
            self.notify("No job selected.", severity="warning")
            return
        if self.running_job is not None:
            self.notify(
                f"Job {self.running_job} is running; one run at a time.",
                severity="warning",
                markup=False,
            )
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._start_run(name)

        self.push_screen(
            ConfirmModal(
                f"Start backup of job {name} now?",
                "Running guests are shut down for the copy and started again.",
                yes="Start",
            ),
            answered,
        )

    def _start_run(self, name: str) -> None:
        self.running_job = name
        self._cancel_run = threading.Event()
        self.jobs_pane.set_running(name)
        self.action_show_tab("log")
        self.log_pane.start_activity(f"job {name}: starting")
        self.log_pane.expect_own_run()
        self._run(name, self._cancel_run)

    @background(group="run")
    def _run(self, name: str, cancel: threading.Event) -> RunResult:
        def log_opened(path: Path) -> None:
            self.post_message(RunLogOpened(path))

        # Someone is watching: a busy guest is reported at once, not waited for.
        return self.engine.run_job(name, cancel=cancel, on_log_path=log_opened, interactive=True)

    def on_cancel_run_requested(self, message: CancelRunRequested) -> None:
        name, cancel = self.running_job, self._cancel_run
        if name is None or cancel is None:
            return

        def answered(yes: bool | None) -> None:
            if yes and cancel is self._cancel_run:
                cancel.set()
                self.notify(f"Cancelling job {name}...", markup=False)

        self.push_screen(
            ConfirmModal(
                f"Cancel the backup of job {name}?",
                "The unfinished copy is removed, the guest is started again if it was "
                "running, and older versions stay as they are.",
                yes="Cancel backup",
            ),
            answered,
        )

    def on_run_log_opened(self, message: RunLogOpened) -> None:
        self.log_pane.follow(message.path, own=True)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Errors are reported by ReportsWorkerErrors; here only the run's end.
        if event.worker.group != "run" or event.state not in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            return
        name = self.running_job
        self.running_job = None
        self._cancel_run = None
        self.jobs_pane.set_running(None)
        self.log_pane.set_run_active(False)
        self.jobs_pane.reload()
        self.restore_pane.load_versions()
        self.guests_pane.reload()
        if self._quit_when_idle:
            # The operator asked to cancel and quit: no modal to answer now.
            self.exit(0)
            return
        result = event.worker.result
        if event.state is WorkerState.SUCCESS and isinstance(result, RunResult):
            self._report_run(name or result.job, result)

    def _report_run(self, name: str, result: RunResult) -> None:
        if result.ok:
            self.notify(f"Job {name}: finished backup.", title="Backup", markup=False)
            return
        self.notify(f"Job {name}: backup failed.", severity="error", markup=False)
        lines = [f"{escape(o.guest)}: {o.message}" for o in result.outcomes]
        lines.append(f"log: {result.log_path}")
        self.post_message(ShowError("Backup failed", f"Job {name}:\n" + "\n".join(lines)))

    # --- other engine activity ---------------------------------------------

    def on_activity_started(self, message: ActivityStarted) -> None:
        self.action_show_tab("log")
        self.log_pane.start_activity(message.title)

    def on_engine_events(self, message: EngineEvents) -> None:
        self.log_pane.feed_events(message.events)

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.restore_pane.reload()

    def on_guests_changed(self, message: GuestsChanged) -> None:
        self.guests_pane.reload()

    # --- errors ------------------------------------------------------------

    def on_show_error(self, message: ShowError) -> None:
        # Several workers can hit one cause (libvirt down): show it once.
        for screen in self.screen_stack:
            if isinstance(screen, ErrorModal) and screen.shows(message.title, message.message):
                return
        self.push_screen(ErrorModal(message.title, message.message))

    # --- quitting ----------------------------------------------------------

    def cancel_work(self) -> None:
        """Cancel a running backup or restore; safe to call from a signal handler."""
        self._quit_when_idle = True
        if self._cancel_run is not None:
            self._cancel_run.set()
        self.restore_pane.cancel()

    async def action_quit(self) -> None:
        busy = self.running_job is not None or self.restore_pane.busy
        if not busy:
            self.exit(0)
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            self.cancel_work()
            self.notify("Cancelling; the console closes once the guest is settled.")

        what = f"A backup of job {self.running_job}" if self.running_job else "A restore"
        self.push_screen(
            ConfirmModal(
                f"{what} is running. Cancel it and quit?",
                "The unfinished copy is removed and running guests are started again "
                "before the console closes.",
                yes="Cancel and quit",
            ),
            answered,
        )

    def on_restore_ended(self, message: RestoreEnded) -> None:
        if self._quit_when_idle and self.running_job is None:
            self.exit(0)

    # --- theme and palette -------------------------------------------------

    def action_use_theme(self, name: str) -> None:
        self.theme = themes.resolve_theme(name, self.available_themes)

    def action_new_job(self) -> None:
        self.action_show_tab("jobs")
        self.jobs_pane.action_new_job()

    def action_restore_selected(self) -> None:
        self.action_show_tab("restore")
        self.restore_pane.action_restore()

    def action_follow_latest(self) -> None:
        self.action_show_tab("log")
        self.log_pane.action_follow_latest()

    @property
    def job_names(self) -> list[str]:
        return [job.name for job in self.jobs_pane.jobs]


def quiet_libvirt() -> None:
    """Stop libvirt printing its errors to the terminal the console draws on.

    libvirt's default handler writes every error to fd 2 ("Domain not found"
    from a plain existence check), which tears the screen. The engine turns
    the errors it cares about into exceptions, so nothing is lost.
    """
    import libvirt

    def ignore(_ctx: object, _error: object) -> None:
        return None

    libvirt.registerErrorHandler(ignore, None)


def run_console(engine: Engine, theme: str | None = None) -> int:
    """Run the console until the operator quits; the exit code for the CLI."""
    quiet_libvirt()
    try:
        app = GuestsafeApp(engine, theme=theme)
    except ValueError as exc:  # an unknown --theme
        print(f"guestsafe: {exc}", file=sys.stderr)
        return 2
    _cancel_on_hangup(app)
    result = app.run()
    return result if isinstance(result, int) else 0


def _cancel_on_hangup(app: GuestsafeApp) -> None:
    """A dropped SSH session (SIGHUP) or a SIGTERM cancels the run, then quits.

    The run worker's thread is joined when the app's event loop closes, so the
    process exits only after the engine has removed the partial copy and
    started the guest again, as a confirmed quit would.
    """

    def hang_up(signum: int, frame: object) -> None:
        app.cancel_work()
        threading.Thread(target=app.call_from_thread, args=(app.exit, 0), daemon=True).start()

    signal.signal(signal.SIGHUP, hang_up)
    signal.signal(signal.SIGTERM, hang_up)
