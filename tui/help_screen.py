"""The console explains itself: every key of the screen it was opened on.

The rows come from that screen's active bindings, after ``keys.toml`` moved
them, so a remapped key shows as the key that works now, marked as the
operator's own; each row names the binding's id, the name ``keys.toml`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import ActiveBinding, Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from .formatting import literal

COLUMNS = ("Key", "Does", "Id in keys.toml")


@dataclass(frozen=True)
class HelpRow:
    keys: str  # as the footer shows them, comma-separated
    does: str
    binding_id: str  # "" for Textual's own bindings, which have none
    remapped: bool  # moved by keys.toml


def help_rows(
    active: Mapping[str, ActiveBinding],
    keymap: Mapping[str, str],
    display: Callable[[Binding], str],
) -> list[HelpRow]:
    """One row per binding (its keys together): the console's own first, nearest first.

    Textual's own bindings (cursor keys, focus), which have no id, come last.
    """
    grouped: dict[tuple[int, str, str], list[str]] = {}
    bindings: dict[tuple[int, str, str], ActiveBinding] = {}
    for active_binding in active.values():
        binding = active_binding.binding
        group = (id(active_binding.node), binding.action, binding.id or binding.description)
        grouped.setdefault(group, []).append(display(binding))
        bindings.setdefault(group, active_binding)
    rows = []
    for group, keys in grouped.items():
        binding = bindings[group].binding
        does = binding.description or binding.action
        rows.append(HelpRow(", ".join(keys), does, binding.id or "", binding.id in keymap))
    return sorted(rows, key=lambda row: not row.binding_id)  # stable: chain order stays


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", id="help.close"),
        Binding("question_mark", "close", "Close", show=False, id="help.close_again"),
    ]

    def __init__(self, title: str, rows: list[HelpRow]) -> None:
        super().__init__(classes="modal")
        self._title = title
        self._rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static(literal(self._title), classes="dialog-title")
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            yield Static(
                'Move a key in keys.toml next to jobs.toml: [keys] "jobs.start" = "f9". '
                "Keys it moved are marked (keys.toml).",
                id="help-note",
                markup=False,
            )
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        for row in self._rows:
            keys = Text(row.keys, style="bold")
            if row.remapped:
                keys.append(" (keys.toml)", style="italic")
            table.add_row(keys, literal(row.does), literal(row.binding_id or "-"))
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)
