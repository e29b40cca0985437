"""TCSS stylesheets and colour themes, shipped as package data.

The console loads ``guestsafe.tcss`` through importlib.resources, so it works
from a wheel as well as from the source tree.
"""

from __future__ import annotations

from importlib import resources

from textual.theme import Theme

from .palette import DARK, HIGH_CONTRAST, LIGHT, THEMES

__all__ = [
    "DARK",
    "DEFAULT_THEME",
    "HIGH_CONTRAST",
    "LIGHT",
    "THEMES",
    "resolve_theme",
    "stylesheet",
]

DEFAULT_THEME = DARK.name
STYLESHEET = "guestsafe.tcss"

# Short names for --theme; the full names work too.
ALIASES: dict[str, str] = {
    "dark": DARK.name,
    "light": LIGHT.name,
    "high-contrast": HIGH_CONTRAST.name,
    "contrast": HIGH_CONTRAST.name,
}


def stylesheet() -> str:
    """The console's TCSS, read from the installed package."""
    return resources.files(__name__).joinpath(STYLESHEET).read_text(encoding="utf-8")


def resolve_theme(name: str | None, available: dict[str, Theme] | None = None) -> str:
    """The registered theme name for ``name`` (an alias, a guestsafe or a Textual theme).

    Raises ``ValueError`` naming the choices when ``name`` is unknown.
    """
    if name is None:
        return DEFAULT_THEME
    known = {theme.name for theme in THEMES} | set(available or {})
    resolved = ALIASES.get(name, name)
    if resolved not in known:
        choices = ", ".join(sorted(set(ALIASES) | known))
        raise ValueError(f"unknown theme {name!r}; choose one of {choices}")
    return resolved
