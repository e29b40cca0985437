"""The one place engine errors appear: a title, the engine's message, and OK."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Static

from .formatting import literal


class ErrorModal(ModalScreen[None]):
    HELP_TITLE = "the error dialog"  # the help screen's name for it
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "OK", id="error.close"),
        Binding("o", "close", "OK", show=False, id="error.ok"),
    ]

    def __init__(self, title: str, message: str) -> None:
        super().__init__(classes="modal")
        self._title = title
        self._message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="error-dialog", classes="dialog dialog-error"):
            yield Static(literal(self._title), classes="dialog-title")
            yield Static(
                literal(self._message, multiline=True), id="error-message", classes="dialog-body"
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", id="error-ok", variant="error")
        yield Footer()

    def shows(self, title: str, message: str) -> bool:
        return (self._title, self._message) == (title, message)

    def on_mount(self) -> None:
        self.query_one("#error-ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
