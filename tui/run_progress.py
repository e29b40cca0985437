"""The progress of the run on show: phase, a bar, bytes done, throughput and ETA."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from . import formatting as fmt
from .model import text as plain
from .model.run_tracker import ProgressView

IDLE = "No run on show. Press f to follow the newest log, or open a past run."


class RunProgressPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(IDLE, id="run-title")
        yield Static("", id="run-phase")
        # No ETA from the bar itself: it would use the wall clock, while ours
        # comes from the log's timestamps and so also fits a past log.
        yield ProgressBar(total=1, show_eta=False, id="run-bar")
        yield Static("", id="run-numbers")

    def set_title(self, title: str) -> None:
        self.query_one("#run-title", Static).update(fmt.literal(title))

    def clear(self, title: str = IDLE) -> None:
        self.set_title(title)
        self.query_one("#run-phase", Static).update("")
        self.query_one("#run-numbers", Static).update("")
        self.query_one(ProgressBar).update(total=1, progress=0)

    def show(self, view: ProgressView) -> None:
        phase = Text("phase: ")
        phase.append(view.phase or "starting", style="bold")
        if view.guest:
            phase.append("  guest: ")
            phase.append_text(fmt.literal(view.guest, style="bold"))
        if view.item:
            phase.append("  disk: ")
            phase.append_text(fmt.literal(view.item))
        if view.downtime:
            phase.append("  downtime: ")
            phase.append(view.downtime, style="bold")
        if view.finished:
            phase.append("  ")
            phase.append_text(fmt.literal(view.finished, style="bold"))
        self.query_one("#run-phase", Static).update(phase)
        self.set_class(view.finished is not None and not view.ok, "failed")
        self.set_class(view.finished is not None and view.ok, "succeeded")
        bar = self.query_one(ProgressBar)
        if view.total > 0:
            bar.update(total=view.total, progress=min(view.done, view.total))
        self.query_one("#run-numbers", Static).update(numbers(view))


def numbers(view: ProgressView) -> str:
    if view.total <= 0:
        return ""
    parts = [f"{plain.size(view.done)} of {plain.size(view.total)}"]
    if view.rate is not None:
        parts.append(plain.rate(view.rate))
    if view.eta is not None and view.done < view.total:
        parts.append(f"ETA {plain.duration(view.eta)}")
    return "  ".join(parts)
