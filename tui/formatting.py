"""Turning engine values into Rich text for cells and labels.

Names come from libvirt and from files an operator or a guest may have chosen,
so they can hold Rich markup ("[b]x[/b]") or control characters. Everything
shown here goes through ``literal``: control characters become visible escapes
and the result is a ``Text``, which is never parsed as markup. The plain texts
(sizes, times, schedules) are in ``model/text.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from guestsafe.engine.api import LastResult, RestoreTest, escape

from .model.text import short_time


@dataclass(frozen=True)
class StatusStyles:
    """Rich styles for good and bad news, taken from the theme in use."""

    ok: str = "green"
    bad: str = "bold red"
    muted: str = "dim"


def literal(value: object, style: str = "", *, multiline: bool = False) -> Text:
    """``value`` shown exactly as it is, whatever brackets or escapes it holds.

    With ``multiline`` the line breaks stay line breaks; every other control
    character is still shown as an escape.
    """
    text = str(value)
    if multiline:
        return Text("\n".join(escape(line) for line in text.split("\n")), style=style)
    return Text(escape(text), style=style)


def last_result(result: LastResult | None, styles: StatusStyles) -> Text:
    if result is None:
        return Text("-", style=styles.muted)
    when = short_time(result.finished)
    if result.ok:
        return Text(f"ok {when}", style=styles.ok)
    return Text(f"FAILED {when}", style=styles.bad)


def restore_test(test: RestoreTest | None, styles: StatusStyles) -> Text:
    """The version's last restore test: "boot ok 14 s", "boot FAILED", "boot error", or ""."""
    if test is None:
        return Text("")
    return Text(test.label(), style=styles.ok if test.ok else styles.bad)


def verified(value: bool | None, styles: StatusStyles) -> Text:
    if value is None:
        return Text("-", style=styles.muted)
    return Text("ok", style=styles.ok) if value else Text("FAILED", style=styles.bad)
