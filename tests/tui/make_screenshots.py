#!/usr/bin/env python3
"""Regenerate the SVG screenshots in screenshots/ from the real console.

The console runs headless on a fresh demo sandbox, backs up the nightly job
for real, and is photographed on each tab and dialog, at 100x32 and at 80x24::

    .venv/bin/python tests/tui/make_screenshots.py [--out screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from textual.pilot import Pilot
from tui_support import fresh_sandbox, settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp, quiet_libvirt
from guestsafe.tui.confirm_modal import ConfirmModal
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.mac_modal import MacClashScreen

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = Path("/tmp/guestsafe-demo-screenshots")
SIZES = {"": (100, 32), "-80x24": (80, 24)}


async def capture(out: Path, suffix: str, size: tuple[int, int]) -> list[Path]:
    engine = Engine.demo(fresh_sandbox(DEMO_DIR))
    app = GuestsafeApp(engine)
    saved: list[Path] = []
    try:
        async with app.run_test(size=size) as pilot:

            async def shot(name: str) -> None:
                await settle(pilot)
                saved.append(Path(app.save_screenshot(f"{name}{suffix}.svg", str(out))))

            await shot("jobs")
            await open_and_close(pilot, "n", JobFormScreen, shot, "job-form")
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
            await shot("confirm-start")
            await pilot.press("y")
            await wait_for(pilot, lambda: app.running_job is None, timeout=120)
            await wait_for(pilot, lambda: app.log_pane._tracker.view.finished is not None)
            await shot("log")
            await pilot.press("r")
            await wait_for(pilot, lambda: app.restore_pane._versions and app.restore_pane.devices)
            await shot("restore")
            web1 = next(i for i, v in enumerate(app.restore_pane._versions) if v.guest == "web1")
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


async def open_and_close(
    pilot: Pilot[Any], key: str, screen: type, shot: Any, name: str
) -> None:
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen))
    await shot(name)
    await pilot.press("escape")
    await settle(pilot)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_libvirt()
    for suffix, size in SIZES.items():
        for path in asyncio.run(capture(args.out, suffix, size)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
