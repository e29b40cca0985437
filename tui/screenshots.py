"""Regenerate the README's SVG screenshots from the real console.

The console runs headless on a fresh demo sandbox, backs up the nightly job
for real, and is photographed on each tab and dialog, at 100x32 and at 80x24.
From the repository's top::

    .venv/bin/python -m guestsafe.tui.screenshots [DIR]     # DIR: screenshots/
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input

from guestsafe.engine.api import Engine, reset_sandbox

from .app import GuestsafeApp, quiet_libvirt
from .confirm_modal import ConfirmModal
from .headless import settle, wait_for
from .help_screen import HelpScreen
from .job_form import JobFormScreen
from .mac_modal import MacClashScreen

DEMO_DIR = Path("/tmp/guestsafe-demo-screenshots")
SIZES = {"": (100, 32), "-80x24": (80, 24)}
Shot = Callable[[str], Awaitable[None]]


async def capture(out: Path, suffix: str, size: tuple[int, int]) -> list[Path]:
    engine = Engine.demo(reset_sandbox(DEMO_DIR))
    app = GuestsafeApp(engine)
    saved: list[Path] = []
    try:
        async with app.run_test(size=size) as pilot:

            async def shot(name: str) -> None:
                await settle(pilot)
                saved.append(Path(app.save_screenshot(f"{name}{suffix}.svg", str(out))))

            await shot("jobs")
            await open_and_close(pilot, "question_mark", HelpScreen, shot, "help")
            await open_and_close(pilot, "n", JobFormScreen, shot, "job-form")
            await prune_preview(pilot, shot)
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
            await shot("confirm-start")
            await pilot.press("y")
            await wait_for(pilot, lambda: app.running_job is None, timeout=120)
            await wait_for(pilot, lambda: app.log_pane.progress.finished is not None)
            await shot("log")
            await pilot.press("r")
            await wait_for(pilot, lambda: app.restore_pane.versions and app.restore_pane.devices)
            await shot("restore")
            versions = app.restore_pane.versions
            web1 = next(i for i, v in enumerate(versions) if v.guest == "web1")
            await pilot.press("home", *["down"] * web1, "enter")
            await pilot.press("home", "ctrl+k", *"web1-copy", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
            await shot("mac-modal")
            await pilot.press("escape")
            await pilot.press("g")
            await shot("guests")
    finally:
        engine.close()
    return saved


async def prune_preview(pilot: Pilot[Any], shot: Shot) -> None:
    """The job form with calendar rules: what each keeps over the simulated days."""
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    rules = {"keep": "3", "keep_daily": "7", "keep_weekly": "4", "keep_monthly": "12"}
    for field, count in rules.items():
        pilot.app.screen.query_one(f"#f-{field}", Input).value = count
    pilot.app.screen.query_one("#f-keep_yearly", Input).focus()  # scrolls the preview in
    await shot("prune-preview")
    await pilot.press("escape")
    await settle(pilot)


async def open_and_close(
    pilot: Pilot[Any], key: str, screen: type[Screen[Any]], shot: Shot, name: str
) -> None:
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen))
    await shot(name)
    await pilot.press("escape")
    await settle(pilot)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=Path("screenshots"),
        metavar="DIR",
        help="where the SVGs go (default: screenshots)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_libvirt()
    for suffix, size in SIZES.items():
        for path in asyncio.run(capture(args.out, suffix, size)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
