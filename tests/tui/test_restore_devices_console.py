"""The restore form's "Onto devices" field: a disk written onto an existing block device."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rig import require
from textual.widgets import DataTable, Static
from tui_support import fill, settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.mac_modal import MacClashScreen
from guestsafe.tui.tick_box import TickBox

pytestmark = pytest.mark.tui

SIZE = (100, 32)


@pytest.fixture
def loop_device(tmp_path: Path, engine: Engine) -> Iterator[Path]:
    require(os.geteuid() == 0 and shutil.which("losetup") is not None, "needs root and losetup")
    assert engine.run_job("nightly").ok
    [version] = [v for v in engine.versions(engine.job("nightly").destination) if v.guest == "web1"]
    image = tmp_path / "target.img"
    with image.open("wb") as f:
        f.truncate(version.manifest.disks[0].virtual_size)
    out = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    )
    device = Path(out.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], capture_output=True, check=False)


async def _submit(pilot: Any, new_name: str, devices: str) -> None:
    app = pilot.app
    await pilot.press("r")
    await settle(pilot)
    row = next(i for i, v in enumerate(app.restore_pane._versions) if v.guest == "web1")
    table = app.query_one("#archive-table", DataTable)
    table.focus()
    await pilot.pause()
    await pilot.press("home", *["down"] * row, "enter")
    await pilot.press("home", "ctrl+k", *new_name)
    await fill(pilot, "#r-disks", devices)
    await pilot.press("enter")


async def test_a_disk_goes_onto_the_device_typed_in_the_form(
    engine: Engine, loop_device: Path
) -> None:
    disk = engine.hv.guest("web1").disks[0].target
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await _submit(pilot, "web1-dev", f"{disk}={loop_device}")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        await settle(pilot)
        assert not isinstance(app.screen, ErrorModal)
    clone = engine.hv.guest("web1-dev")
    assert (clone.disks[0].kind, clone.disks[0].source) == ("block", str(loop_device))


async def test_a_device_spec_without_a_disk_is_refused_in_the_form(
    engine: Engine, loop_device: Path
) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await _submit(pilot, "web1-bad", str(loop_device))
        await settle(pilot)
        error = app.query_one("#r-error", Static)
        assert "write each as DISK=DEVICE" in str(error.render())
        assert not engine.hv.exists("web1-bad")


async def test_an_unknown_disk_is_refused_by_the_plan(engine: Engine, loop_device: Path) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await _submit(pilot, "web1-vdz", f"vdz={loop_device}")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert "has no disk vdz" in str(app.screen.query_one("#error-message", Static).render())
    assert not engine.hv.exists("web1-vdz")


async def test_a_device_holding_a_filesystem_needs_the_overwrite_box(
    engine: Engine, loop_device: Path
) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(loop_device)], check=True)
    disk = engine.hv.guest("web1").disks[0].target
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await _submit(pilot, "web1-keep", f"{disk}={loop_device}")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal), timeout=60)
        message = str(app.screen.query_one("#error-message", Static).render())
        assert "wipefs -a" in message, message
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        assert not engine.hv.exists("web1-keep")
        assert _filesystem(loop_device) == "ext4"  # nothing was written

        app.query_one("#r-overwrite", TickBox).value = True
        await _submit(pilot, "web1-wiped", f"{disk}={loop_device}")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        await settle(pilot)
        assert not isinstance(app.screen, ErrorModal)
    clone = engine.hv.guest("web1-wiped")
    assert (clone.disks[0].kind, clone.disks[0].source) == ("block", str(loop_device))
    assert _filesystem(loop_device) != "ext4"  # the version's disk is on it now


def _filesystem(device: Path) -> str:
    out = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(device)], capture_output=True, text=True
    )
    return out.stdout.strip()
