"""Status colours from the theme in use, for Rich text in tables and logs."""

from __future__ import annotations

from typing import Any

from textual.app import App

from .formatting import StatusStyles


def status_styles(app: App[Any]) -> StatusStyles:
    theme = app.current_theme
    return StatusStyles(
        ok=theme.success or "green",
        bad=f"bold {theme.error or 'red'}",
        muted="dim",
    )
