"""External devices in the console: the Restore tab's live list, archive probing,
browsing and restoring from a device, and the job form's device suggestions.

The demo engine's watcher is fed by hand (engine.devices.ManualWatcher), so these
tests plug and unplug devices without udev; the real watcher is tested against
udev and loop devices in tests/integration/test_devices_live.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Select, Static
from tui_support import fill, settle, type_into, wait_for

from guestsafe.engine import demo
from guestsafe.engine.api import Engine
from guestsafe.engine.devices.udev import BlockDevice
from guestsafe.engine.devices.watch import ManualWatcher
from guestsafe.engine.errors import DeviceError
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.devices_panel import ExternalDevicesPanel
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.mac_modal import MacClashScreen
from guestsafe.tui.restore_pane import DEVICE_PREFIX

pytestmark = pytest.mark.tui

SIZE = (100, 32)
STICK = replace(
    demo.DEMO_DEVICE,
    node="/dev/sdc1",
    name="sdc1",
    label="STICK",
    uuid="ABCD-1234",
    fstype="exfat",
    has_marker=None,
)


async def open_restore(pilot: Any) -> None:
    await settle(pilot)
    await pilot.press("r")
    app = pilot.app
    await wait_for(pilot, lambda: app.restore_pane.devices)
    await settle(pilot)


def watcher_of(app: GuestsafeApp) -> ManualWatcher:
    watcher = app.restore_pane._watcher
    assert isinstance(watcher, ManualWatcher)
    return watcher


def choices(app: GuestsafeApp) -> list[str]:
    select = app.query_one("#dest-select", Select)
    return [str(value) for _label, value in select._options if value is not Select.NULL]


async def test_the_list_follows_plugging_and_unplugging_within_a_second(engine: Engine) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_restore(pilot)
        panel = app.query_one(ExternalDevicesPanel)
        assert [(d.node, d.label, d.archive) for d in panel.devices] == [
            ("/dev/sdb1", "BACKUP", True)
        ]

        await asyncio.to_thread(watcher_of(app).set_devices, [demo.DEMO_DEVICE, STICK])
        await wait_for(pilot, lambda: len(panel.devices) == 2, timeout=1)
        assert app.query_one("#devices-table", DataTable).row_count == 2

        await asyncio.to_thread(watcher_of(app).set_devices, [demo.DEMO_DEVICE])
        await wait_for(pilot, lambda: len(panel.devices) == 1, timeout=1)


async def test_a_new_device_is_probed_once_and_offered_when_it_holds_an_archive(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[str] = []

    def probe(found: list[BlockDevice]) -> list[BlockDevice]:
        probed.extend(d.node for d in found)
        return [d.with_marker(True, "5f1e6f36-1111-4c55-9c5c-111111111111") for d in found]

    monkeypatch.setattr(engine, "probe_markers", probe)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_restore(pilot)
        assert DEVICE_PREFIX + demo.DEMO_DEVICE.spec in choices(app)

        await asyncio.to_thread(watcher_of(app).set_devices, [demo.DEMO_DEVICE, STICK])
        await wait_for(pilot, lambda: DEVICE_PREFIX + STICK.spec in choices(app))
        panel = app.query_one(ExternalDevicesPanel)
        assert [d.archive for d in panel.devices] == [True, True]
        # A listing triggered by anything else does not mount it again.
        await asyncio.to_thread(watcher_of(app).set_devices, [STICK, demo.DEMO_DEVICE])
        await settle(pilot)
        assert probed == ["/dev/sdc1"]


async def test_an_archive_on_a_device_is_browsed_and_restored_from(engine: Engine) -> None:
    assert engine.run_job("nightly").ok
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_restore(pilot)
        pane = app.restore_pane
        status = app.query_one("#archive-status", Static)
        app.query_one("#dest-select", Select).value = DEVICE_PREFIX + demo.DEMO_DEVICE.spec
        await wait_for(pilot, lambda: "on the device" in str(status.render()))
        assert pane.device_spec == demo.DEMO_DEVICE.spec and pane.destination is None
        row = next(i for i, v in enumerate(pane._versions) if v.guest == "db1")
        table = app.query_one("#archive-table", DataTable)
        table.focus()
        table.move_cursor(row=row)
        await pilot.press("enter")
        await pilot.press("home", "ctrl+k", *"db1-usb", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, MacClashScreen))
        await wait_for(pilot, lambda: not pane.busy, timeout=60)
        await settle(pilot)

    assert engine.hv.exists("db1-usb")


async def test_unplugging_the_chosen_device_goes_back_to_a_destination(engine: Engine) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_restore(pilot)
        pane = app.restore_pane
        app.query_one("#dest-select", Select).value = DEVICE_PREFIX + demo.DEMO_DEVICE.spec
        await wait_for(pilot, lambda: pane.device_spec is not None)

        await asyncio.to_thread(watcher_of(app).set_devices, [])
        sandbox = engine.site
        assert isinstance(sandbox, demo.Sandbox)
        await wait_for(pilot, lambda: pane.destination == sandbox.archive_dir)
        assert app.query_one("#devices-empty", Static).display


async def test_without_udev_the_panel_says_why(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_udev(callback: object) -> None:
        raise DeviceError("cannot watch for devices: no udev monitor; is systemd-udevd running?")

    monkeypatch.setattr(engine, "watch_devices", no_udev)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        empty = app.query_one("#devices-empty", Static)
        await wait_for(pilot, lambda: "systemd-udevd" in str(empty.render()))
        assert app.screen is app.screen_stack[0]  # no error modal on top


# --- the job form ------------------------------------------------------------------


async def open_form(pilot: Any) -> JobFormScreen:
    await settle(pilot)
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, JobFormScreen)
    return screen


async def test_the_job_form_offers_the_detected_devices(engine: Engine) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form(pilot)
        hint = form.query_one("#device-hint", Static)
        assert not hint.display  # only at the device field

        await type_into(pilot, "#f-device", "UU")
        assert hint.display
        assert f"detected: {demo.DEMO_DEVICE.spec} (BACKUP, /dev/sdb1, ext4)" in str(hint.render())
        await pilot.press("right")  # take the suggestion
        assert form.query_one("#f-device", Input).value == demo.DEMO_DEVICE.spec

        await type_into(pilot, "#f-device", "/dev/sdb1")
        assert f"tip: {demo.DEMO_DEVICE.spec} names this disk even after re-plugging" in str(
            hint.render()
        )


async def test_saving_a_dev_node_notes_the_uuid_form(engine: Engine, tmp_path: Path) -> None:
    node = next((p for p in sorted(Path("/dev").iterdir()) if p.is_block_device()), None)
    if node is None:
        pytest.skip("no block device node on this host")
    destination = tmp_path / "mnt"
    destination.mkdir()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_form(pilot)
        await type_into(pilot, "#f-name", "usb")
        await type_into(pilot, "#f-guests", "web1")
        await fill(pilot, "#f-destination", str(destination))
        await fill(pilot, "#f-device", str(node))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, JobFormScreen))
        await settle(pilot)
        notes = [str(n.message) for n in app._notifications]

    assert engine.job("usb").device == str(node)
    assert any("names a disk even after re-plugging" in n for n in notes), notes
