"""The Log tab: a live tail of a run's log file, its progress, and past runs.

The log file is the source, not the engine's events, so the pane shows a run
started by the timer or from a shell exactly as it shows its own. A thread
worker reads the file and posts new lines at most every 0.2 s; the UI thread
only draws batches. Restores write no log file, so their events are fed in
directly and drawn the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import OptionList, RichLog, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from guestsafe.engine.api import Engine
from guestsafe.engine.events import Event

from . import formatting as fmt
from .messages import CancelRunRequested, LogLines
from .model.run_tracker import DisplayLine, ProgressView, RunTracker
from .model.tailing import LogFollower
from .run_progress import RunProgressPanel
from .styles import status_styles
from .worker_errors import ReportsWorkerErrors, background

MAX_LINES = 5000
FLUSH_INTERVAL = 0.2
POLL_INTERVAL = 0.1
MAX_BATCH = 500
SCAN_INTERVAL = 2.0
# A log written to this recently belongs to a run that may still be going.
RECENT_SECONDS = 60.0


class LogPane(ReportsWorkerErrors, Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "follow_latest", "Follow newest", id="log.follow"),
        Binding("p", "toggle_runs", "Past runs", id="log.runs"),
        Binding("c", "cancel_run", "Cancel run", id="log.cancel"),
    ]

    def __init__(self, engine: Engine, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._engine = engine
        self._tracker = RunTracker()
        self._generation = 0
        self._current: Path | None = None
        self._own_runs: set[Path] = set()
        self._offered: set[Path] = set()
        # Set while a run started here has not yet named its log file, so the
        # scan does not offer that file as someone else's run.
        self._expecting_own_run = False
        self._run_active = False
        self._scanned = False

    def compose(self) -> ComposeResult:
        yield RunProgressPanel(id="run-progress")
        with Horizontal(id="log-body"):
            yield RichLog(
                id="log-view",
                max_lines=MAX_LINES,
                min_width=20,  # wrap at the pane's width, not RichLog's default of 78
                wrap=True,
                markup=False,
                highlight=False,
            )
            with Vertical(id="past-runs"):
                yield Static("Past runs", id="past-runs-title")
                yield OptionList(id="runs-list", compact=True)

    def on_mount(self) -> None:
        self.query_one("#log-view", RichLog).border_title = "log"
        self.scan()
        self.set_interval(SCAN_INTERVAL, self.scan)

    @property
    def current(self) -> Path | None:
        """The log file on show, if any."""
        return self._current

    @property
    def progress(self) -> ProgressView:
        """What the run on show has got to, as the progress panel shows it."""
        return self._tracker.view

    # --- what to show ------------------------------------------------------

    def _begin(self, title: str) -> None:
        self._generation += 1
        self._tracker.reset()
        self.query_one("#log-view", RichLog).clear()
        panel = self.query_one(RunProgressPanel)
        panel.clear(title)
        panel.show(self._tracker.view)

    def expect_own_run(self) -> None:
        """A run is starting here; its log file will arrive through ``follow(own=True)``."""
        self._expecting_own_run = True
        self.set_run_active(True)

    def set_run_active(self, active: bool) -> None:
        self._run_active = active
        if not active:
            self._expecting_own_run = False
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_run":
            return self._run_active
        return True

    def action_cancel_run(self) -> None:
        self.post_message(CancelRunRequested())

    def follow(self, path: Path, *, own: bool = False) -> None:
        """Show ``path`` from its start (its last 512 KiB) and keep reading as it grows."""
        if own:
            self._own_runs.add(path)
            self._expecting_own_run = False
        self._offered.add(path)
        self._current = path
        self._begin(path.name)
        self.query_one("#log-view", RichLog).border_title = str(path)
        self._tail(path, self._generation)

    def start_activity(self, title: str) -> None:
        """Show events of an engine call that writes no log file (a restore, recovery)."""
        self._current = None
        self.workers.cancel_group(self, "tail")
        self._begin(title)
        self.query_one("#log-view", RichLog).border_title = "log"

    def feed_events(self, events: Iterable[Event]) -> None:
        now = time.time()
        self._write(self._tracker.feed_event(event, now) for event in events)

    @background(group="tail")
    def _tail(self, path: Path, generation: int) -> None:
        worker = get_current_worker()
        follower = LogFollower(path)
        batch: list[str] = []
        last_flush = float("-inf")
        while not worker.is_cancelled:
            lines = follower.read_new()
            batch.extend(lines)
            now = time.monotonic()
            flushed = False
            # Big backlogs (a past log) go in slices, so keys are handled between them.
            if batch and (now - last_flush >= FLUSH_INTERVAL or len(batch) >= MAX_BATCH):
                chunk, batch = batch[:MAX_BATCH], batch[MAX_BATCH:]
                self.post_message(LogLines(path, generation, chunk))
                last_flush, flushed = now, True
            if not lines and not flushed:
                time.sleep(POLL_INTERVAL)

    def on_log_lines(self, message: LogLines) -> None:
        if message.generation != self._generation:
            return  # from a file no longer on show
        self._write(self._tracker.feed_line(line) for line in message.lines)

    def _write(self, lines: Iterable[DisplayLine | None]) -> None:
        log = self.query_one("#log-view", RichLog)
        styles = self._level_styles()
        with self.app.batch_update():
            for line in lines:
                if line is not None:
                    log.write(render_line(line, styles))
            self.query_one(RunProgressPanel).show(self._tracker.view)

    def _level_styles(self) -> dict[str, str]:
        theme = self.app.current_theme
        status = status_styles(self.app)
        return {
            "WARNING": f"bold {theme.warning or 'yellow'}",
            "ERROR": status.bad,
            "FAILED": status.bad,
            "RESULT": f"bold {status.ok}",
            "PHASE": f"bold {theme.accent or 'cyan'}",
        }

    # --- past runs ---------------------------------------------------------

    @background(group="scan")
    def scan(self) -> None:
        """List the past runs' logs, and offer to follow a run this console did not start."""
        files = self._engine.log_files()
        now = time.time()
        recent = []
        for path in files[:1]:
            try:
                if now - path.stat().st_mtime < RECENT_SECONDS:
                    recent.append(path)
            except OSError:
                continue
        self.app.call_from_thread(self._scanned_files, files, recent)

    def _scanned_files(self, files: list[Path], recent: list[Path]) -> None:
        runs = self.query_one("#runs-list", OptionList)
        ids = [str(path) for path in files]
        if ids != [runs.get_option_at_index(i).id for i in range(runs.option_count)]:
            highlighted = runs.highlighted
            runs.clear_options()
            runs.add_options(Option(fmt.literal(path.name), id=str(path)) for path in files)
            if highlighted is not None and files:
                runs.highlighted = min(highlighted, len(files) - 1)
        for path in recent:
            if self._expecting_own_run:
                continue  # most likely the run just started here
            if path not in self._offered and path != self._current:
                self._offered.add(path)
                self.app.notify(
                    f"A run is writing {path.name}. Press f on the Log tab to follow it.",
                    title="Run in progress",
                    markup=False,
                    timeout=10,
                )
        self._scanned = True

    @on(OptionList.OptionSelected, "#runs-list")
    def _open_run(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.follow(Path(event.option.id))

    def action_follow_latest(self) -> None:
        self._follow_latest()

    @background(group="latest")
    def _follow_latest(self) -> None:
        files = self._engine.log_files()
        if not files:
            self.app.notify("No run has written a log yet.", severity="warning")
            return
        self.app.call_from_thread(self.follow, files[0])

    def action_toggle_runs(self) -> None:
        runs = self.query_one("#past-runs")
        runs.display = not runs.display
        if runs.display:
            self.query_one("#runs-list", OptionList).focus()

    def focus_log(self) -> None:
        self.query_one("#log-view", RichLog).focus()


def render_line(line: DisplayLine, styles: dict[str, str]) -> Text:
    text = Text()
    if line.time:
        text.append(line.time + " ", style="dim")
    style = styles.get(line.level, "")
    if line.level not in ("", "INFO", "PHASE", "RESULT", "END"):
        text.append(line.level + " ", style=style)
    if line.guest:
        text.append(line.guest, style="bold")
        text.append(": ")
    if line.level == "PHASE":
        text.append("-- " + line.text, style=style)
    else:
        text.append(line.text, style=style if line.level in ("ERROR", "FAILED", "RESULT") else "")
    return text
