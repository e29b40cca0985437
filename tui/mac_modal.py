"""Settle MAC clashes before a restore: keep each clashing MAC, or take a new one.

Shown too when some host's MACs could not be read: every interface is then
offered, since the original guest may be on the host that did not answer.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, RadioSet, Static

from guestsafe.engine.api import KEEP, NEW, InterfacePlan, RestorePlan

from .choice_button import ChoiceButton
from .formatting import literal

WHY = (
    "Two guests with one MAC (and so one IP) break the network. "
    "Keep a MAC only if the original guest will not run again on this network."
)


class MacClashScreen(ModalScreen[dict[int, str] | None]):
    """Returns {interface index: "keep" | "new"}, or None when cancelled."""

    HELP_TITLE = "the MAC choice"  # the help screen's name for it

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f2", "restore", "Restore", id="mac.restore"),
        Binding("escape", "cancel", "Cancel", id="mac.cancel"),
    ]

    def __init__(self, plan: RestorePlan) -> None:
        super().__init__(classes="modal")
        self._plan = plan

    def compose(self) -> ComposeResult:
        plan = self._plan
        what = "MAC address clash" if plan.clashes else "MACs not checked on every host"
        title = Text(f"{what}: restoring ")
        title.append_text(literal(plan.version.guest))
        title.append(f" version {plan.version.number} as ")
        title.append_text(literal(plan.new_name))
        with Vertical(id="mac-dialog", classes="dialog"):
            yield Static(title, classes="dialog-title")
            yield Static(WHY, id="mac-why", classes="dialog-body")
            if plan.unchecked_note is not None:
                yield Static(
                    literal(plan.unchecked_note), id="mac-unchecked", classes="dialog-body"
                )
            with VerticalScroll(id="mac-rows"):
                for iface in plan.to_settle:
                    yield Static(_row_text(iface), classes="mac-clash")
                    # The safe choice first: the cursor starts on it, and it is pressed.
                    yield RadioSet(
                        ChoiceButton(
                            f"new {iface.new_mac}", True, id=f"mac-{iface.index}-new", compact=True
                        ),
                        ChoiceButton(
                            f"keep {iface.mac}", id=f"mac-{iface.index}-keep", compact=True
                        ),
                        id=f"mac-{iface.index}",
                        classes="mac-choice horizontal",
                        compact=True,
                    )
            with Horizontal(classes="dialog-buttons"):
                yield Button("Restore (F2)", id="mac-restore", variant="primary", compact=True)
                yield Button("Cancel (Esc)", id="mac-cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query(RadioSet).first().focus()

    def choices(self) -> dict[int, str]:
        chosen: dict[int, str] = {}
        for iface in self._plan.to_settle:
            pressed = self.query_one(f"#mac-{iface.index}", RadioSet).pressed_button
            keep = pressed is not None and pressed.id == f"mac-{iface.index}-keep"
            chosen[iface.index] = KEEP if keep else NEW
        return chosen

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "mac-restore":
            self.action_restore()
        else:
            self.action_cancel()

    def action_restore(self) -> None:
        self.dismiss(self.choices())

    def action_cancel(self) -> None:
        self.dismiss(None)


def _row_text(iface: InterfacePlan) -> Text:
    if iface.clash_with is None:
        return Text(f"Interface {iface.index}: {iface.mac} is not used on the hosts that answered")
    line = Text(f"Interface {iface.index}: {iface.mac} is used by ")
    line.append_text(literal(iface.clash_with))
    return line
