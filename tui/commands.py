"""The command palette's guestsafe commands: the main actions, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.fuzzy import Matcher

from guestsafe.engine.api import escape

from ..themes import THEMES

# Titles hold job names, which may look like markup: they are never parsed as
# markup, so the match is highlighted here rather than by Matcher.highlight.
MATCH_STYLE = "bold underline"


@dataclass(frozen=True)
class PaletteCommand:
    title: str
    help: str
    run: Callable[[], object]


@runtime_checkable
class ConsoleActions(Protocol):
    """What the palette needs of the app."""

    @property
    def job_names(self) -> list[str]: ...
    def action_new_job(self) -> None: ...
    def action_start_job(self, name: str | None = None) -> None: ...
    def action_restore_selected(self) -> None: ...
    def action_follow_latest(self) -> None: ...
    def action_refresh(self) -> None: ...
    def action_show_tab(self, tab: str) -> None: ...
    def action_use_theme(self, name: str) -> None: ...


TABS = (("jobs", "Jobs"), ("restore", "Restore"), ("log", "Log"), ("guests", "Guests"))


def console_commands(app: ConsoleActions) -> list[PaletteCommand]:
    commands = [
        PaletteCommand("New job", "Create a backup job", app.action_new_job),
        PaletteCommand(
            "Start selected job",
            "Back up the job selected on the Jobs tab now",
            app.action_start_job,
        ),
    ]
    commands += [
        PaletteCommand(
            escape(f"Start job {name}"),
            "Back up this job now (asks first)",
            partial(app.action_start_job, name),
        )
        for name in app.job_names
    ]
    commands += [
        PaletteCommand(
            "Restore selected version",
            "Restore the version selected on the Restore tab",
            app.action_restore_selected,
        ),
        PaletteCommand(
            "Follow latest log",
            "Tail the newest run's log, whoever started it",
            app.action_follow_latest,
        ),
        PaletteCommand("Refresh", "Reload jobs, archives, guests and logs", app.action_refresh),
    ]
    commands += [
        PaletteCommand(
            f"Show {label}", f"Switch to the {label} tab", partial(app.action_show_tab, tab)
        )
        for tab, label in TABS
    ]
    for theme in THEMES:
        label = theme.name.removeprefix("guestsafe-").replace("-", " ")
        commands.append(
            PaletteCommand(
                f"Theme: {label}",
                f"Switch the colours to {theme.name}",
                partial(app.action_use_theme, theme.name),
            )
        )
    return commands


class GuestsafeCommands(Provider):
    def _commands(self) -> list[PaletteCommand]:
        app = self.app
        return console_commands(app) if isinstance(app, ConsoleActions) else []

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(
                Content(command.title), command.run, text=command.title, help=command.help
            )

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(
                    score,
                    highlight(matcher, query, command.title),
                    command.run,
                    text=command.title,
                    help=command.help,
                )


def highlight(matcher: Matcher, query: str, title: str) -> Content:
    content = Content(title)
    _score, offsets = matcher.fuzzy_search.match(query, title)
    for offset in offsets:
        if not title[offset].isspace():
            content = content.stylize(MATCH_STYLE, offset, offset + 1)
    return content
