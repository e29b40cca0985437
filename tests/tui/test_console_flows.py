"""Pilot tests: drive the console with keys and check what the ENGINE did."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Static
from textual.worker import WorkerState
from tui_support import fill, settle, type_into, wait_for

from guestsafe.engine import demo
from guestsafe.engine.api import Engine
from guestsafe.engine.hypervisor.domain_xml import RUNNING
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.confirm_modal import ConfirmModal
from guestsafe.tui.error_modal import ErrorModal
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.mac_modal import MacClashScreen

pytestmark = pytest.mark.tui

SIZE = (100, 32)


def notifications(app: GuestsafeApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def open_job_form(pilot: Any) -> JobFormScreen:
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobFormScreen))
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, JobFormScreen)
    return screen


async def select_row(pilot: Any, table_id: str, key: str) -> None:
    table = pilot.app.query_one(table_id, DataTable)
    table.focus()
    await pilot.pause()
    await pilot.press("home")
    keys = [str(k.value) for k in table.rows]
    for _ in range(keys.index(key)):
        await pilot.press("down")
    await pilot.pause()


async def test_create_job_start_it_and_a_version_exists(engine: Engine, tmp_path: Path) -> None:
    destination = tmp_path / "backups"
    destination.mkdir()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_job_form(pilot)
        await type_into(pilot, "#f-name", "web-only")
        await type_into(pilot, "#f-guests", "web1")
        await fill(pilot, "#f-destination", str(destination))
        await type_into(pilot, "#f-keep", "2")
        await type_into(pilot, "#f-time", "01:30")
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, JobFormScreen))
        await settle(pilot)

        saved = engine.job("web-only")
        assert (saved.guests, saved.destination, saved.keep) == (["web1"], destination, 2)
        assert saved.schedule.time == "01:30"

        await select_row(pilot, "#jobs-table", "web-only")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        question = app.screen.query_one("#confirm-question", Static)
        assert "Start backup of job web-only now?" in str(question.render())
        await pilot.press("y")
        await wait_for(pilot, lambda: app.running_job is None, timeout=60)
        await settle(pilot)

        assert app.active_tab == "log"
        versions = engine.versions(destination)
        assert [(v.guest, v.number) for v in versions] == [("web1", 1)]
        assert engine.last_results()["web-only"].ok
        assert any("finished backup" in n for n in notifications(app))
        assert not isinstance(app.screen, ErrorModal)
        # The Log tab tailed the run's own log file to its end.
        assert app.log_pane.current is not None
        await wait_for(pilot, lambda: app.log_pane._tracker.view.finished == "finished backup")


@pytest.mark.parametrize(
    ("guest", "new_name", "keys", "expect"),
    [
        # keep the clashing MAC: the clone shares web1's MAC on purpose
        ("web1", "web1-copy", ["right", "enter"], ["keep"]),
        # mail has two interfaces: keep the first, take a new second
        ("mail", "mail-copy", ["right", "enter"], ["keep", "new"]),
    ],
)
async def test_restore_to_a_new_id_settling_a_mac_clash(
    engine: Engine,
    sandbox: demo.Sandbox,
    guest: str,
    new_name: str,
    keys: list[str],
    expect: list[str],
) -> None:
    job = "nightly" if guest == "web1" else "mail-weekly"
    assert engine.run_job(job).ok
    original = engine.hv.guest(guest).macs
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        assert app.active_tab == "restore"
        versions = app.restore_pane._versions
        row = next(i for i, v in enumerate(versions) if v.guest == guest)
        await select_row(pilot, "#archive-table", str(row))
        await pilot.press("enter")  # take this version; focus goes to New ID
        await pilot.press("home", "ctrl+k", *new_name, "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, MacClashScreen))
        modal = app.screen
        assert isinstance(modal, MacClashScreen)
        assert "Two guests with one MAC (and so one IP) break the network" in str(
            modal.query_one("#mac-why", Static).render()
        )
        # The first interface's choice has focus; choose "keep" for it only.
        await pilot.press(*keys)
        await pilot.press("f2")
        await wait_for(pilot, lambda: not isinstance(app.screen, MacClashScreen))
        await wait_for(pilot, lambda: not app.restore_pane.busy, timeout=60)
        await settle(pilot)
        assert any("restore successful" in n for n in notifications(app))

    clone = engine.hv.guest(new_name)
    assert clone.state != RUNNING  # defined, not started
    assert clone.macs[0] == original[0]
    if expect[1:] == ["new"]:
        assert clone.macs[1] != original[1]
        assert engine.hv.all_macs()[clone.macs[1]] == new_name  # unique to the clone


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("#f-keep", "0", "keep must be at least 1"),
        ("#f-time", "25:00", "time must be"),
        ("#f-destination", "", "destination is required"),
        ("#f-destination", "/nonexistent/guestsafe-test", "does not exist"),
        ("#f-guests", "web1, nosuch", "'nosuch' is not defined"),
        ("#f-device", "/dev/null", "not a block device"),
        ("#f-name", "nightly", "taken by another job"),
    ],
)
async def test_invalid_form_input_is_refused_and_nothing_saved(
    engine: Engine, tmp_path: Path, field: str, value: str, problem: str
) -> None:
    before = engine.jobs()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        form = await open_job_form(pilot)
        await fill(pilot, "#f-name", "fresh")
        await fill(pilot, "#f-guests", "web1")
        await fill(pilot, "#f-destination", str(tmp_path))
        await type_into(pilot, field, value)
        await pilot.press("f2")
        await settle(pilot)
        assert app.screen is form, "an invalid job must keep the form open"
        error = form.query_one("#e-" + field.removeprefix("#f-"), Static)
        assert error.display
        assert problem in str(error.render())
        assert form.query_one(field).has_class("invalid")
    assert engine.jobs() == before


async def test_all_three_errors_at_once_are_each_shown_at_their_field(engine: Engine) -> None:
    before = engine.jobs()
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        form = await open_job_form(pilot)
        await type_into(pilot, "#f-name", "bad")
        await type_into(pilot, "#f-guests", "web1")
        await type_into(pilot, "#f-keep", "0")
        await type_into(pilot, "#f-time", "25:00")
        await pilot.press("f2")
        await settle(pilot)
        assert app.screen is form
        for name in ("keep", "time", "destination"):
            assert form.query_one(f"#e-{name}", Static).display, name
        assert not form.query_one("#e-guests", Static).display
        # Escape leaves without saving.
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, JobFormScreen)
    assert engine.jobs() == before


async def test_a_job_whose_destination_was_removed_fails_into_the_error_modal(
    engine: Engine, sandbox: demo.Sandbox
) -> None:
    shutil.rmtree(sandbox.archive_dir, ignore_errors=True)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await select_row(pilot, "#jobs-table", "nightly")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal), timeout=60)
        modal = app.screen
        assert isinstance(modal, ErrorModal)
        text = str(modal.query_one("#error-message", Static).render())
        assert "does not exist" in text
        assert "web1" in text and "db1" in text
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, ErrorModal)
    result = engine.last_results()["nightly"]
    assert not result.ok
    # Nothing was stopped: the guests run as before.
    assert engine.hv.state("web1") == RUNNING


async def test_a_broken_jobs_file_surfaces_as_one_error_modal(engine: Engine) -> None:
    engine.paths.config_file.write_text(
        '[jobs.x]\nguests = ["web1"]\ndestination = "/srv"\nkepp = 3\n'
    )
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorModal)
        text = str(app.screen.query_one("#error-message", Static).render())
        assert "kepp" in text
        # Jobs and Restore both read the file; the operator sees the error once.
        assert sum(isinstance(s, ErrorModal) for s in app.screen_stack) == 1


async def test_the_ui_answers_keys_while_a_long_copy_runs(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    inside = threading.Event()
    real_run_job = engine.run_job

    def slow_run_job(name: str, reporter: Any = None, **kwargs: Any) -> Any:
        opened = kwargs.pop("on_log_path")

        def on_log_path(path: Path) -> None:
            opened(path)
            inside.set()
            gate.wait(60)  # the run is under way, its log exists, and it holds here

        return real_run_job(name, on_log_path=on_log_path, **kwargs)

    monkeypatch.setattr(engine, "run_job", slow_run_job)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await select_row(pilot, "#jobs-table", "nightly")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await wait_for(pilot, inside.is_set)
        run = next(w for w in app.workers if w.group == "run")
        assert run.state is WorkerState.RUNNING
        assert app.active_tab == "log"

        await pilot.press("j")
        assert app.active_tab == "jobs"
        await pilot.press("g")
        assert app.active_tab == "guests"
        await pilot.press("r")
        assert app.active_tab == "restore"
        # A second start is refused while the first runs.
        await pilot.press("j", "s")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmModal)
        assert any("one run at a time" in n for n in notifications(app))
        assert run.state is WorkerState.RUNNING, "the keys were handled while the run was busy"

        gate.set()
        await wait_for(pilot, lambda: app.running_job is None, timeout=60)
        await settle(pilot)
    assert {v.guest for v in engine.versions(engine.job("nightly").destination)} == {"web1", "db1"}


async def test_quitting_during_a_run_asks_and_waits_for_the_guest(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_run_job = engine.run_job

    def slow_run_job(name: str, reporter: Any = None, **kwargs: Any) -> Any:
        gate.wait(60)
        return real_run_job(name, **kwargs)

    monkeypatch.setattr(engine, "run_job", slow_run_job)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.running_job is not None)
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await pilot.pause()
        assert app.is_running, "the console waits for the run to settle"
        gate.set()
        await wait_for(pilot, lambda: not app.is_running, timeout=60)
    assert engine.hv.state("web1") == RUNNING


async def test_the_command_palette_switches_theme_and_starts_a_job(engine: Engine) -> None:
    app = GuestsafeApp(engine, theme="dark")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Theme: high contrast")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert app.theme == "guestsafe-high-contrast"
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Start job mail-weekly")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        assert "mail-weekly" in str(app.screen.query_one("#confirm-question", Static).render())
        await pilot.press("n")
        await settle(pilot)
    assert engine.last_results() == {}


def test_an_unknown_theme_is_refused_before_the_console_opens(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from guestsafe.tui.app import run_console

    assert run_console(engine, theme="neon") == 2
    assert "unknown theme 'neon'" in capsys.readouterr().err


async def test_a_run_started_outside_the_console_is_offered_and_followed(
    engine: Engine, sandbox: demo.Sandbox
) -> None:
    gate = threading.Event()
    outside = Engine.demo(sandbox)  # as `guestsafe run` from a shell would
    results: list[Any] = []

    def shell_run() -> None:
        results.append(outside.run_job("mail-weekly", on_log_path=lambda _path: gate.wait(60)))

    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        thread = threading.Thread(target=shell_run)
        thread.start()
        try:
            await wait_for(pilot, lambda: engine.log_files())
            app.log_pane.scan()
            await wait_for(pilot, lambda: any("A run is writing" in n for n in notifications(app)))
            await pilot.press("l", "f")
            newest = engine.log_files()[0]
            await wait_for(pilot, lambda: app.log_pane.current == newest)
            gate.set()
            await wait_for(pilot, lambda: app.log_pane._tracker.view.finished is not None)
            assert app.log_pane._tracker.view.finished == "finished backup"
        finally:
            gate.set()
            thread.join(60)
            outside.close()
    assert results and results[0].ok


async def test_cancelling_a_run_from_the_log_tab(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = threading.Event()
    real_run_job = engine.run_job

    def slow_run_job(name: str, reporter: Any = None, **kwargs: Any) -> Any:
        cancel: threading.Event = kwargs["cancel"]
        opened = kwargs.pop("on_log_path")

        def on_log_path(path: Path) -> None:
            opened(path)
            inside.set()
            cancel.wait(60)  # held until the operator cancels

        return real_run_job(name, on_log_path=on_log_path, **kwargs)

    monkeypatch.setattr(engine, "run_job", slow_run_job)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await wait_for(pilot, inside.is_set)
        assert app.active_tab == "log"
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.running_job is None, timeout=60)
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        await settle(pilot)
    assert not engine.last_results()["nightly"].ok
    assert engine.hv.state("web1") == RUNNING
    dest = engine.job("nightly").destination
    assert not (dest / "guestsafe-archive.json").exists() or engine.versions(dest) == []


async def test_keys_toml_remaps_a_binding_by_its_id(engine: Engine) -> None:
    keys = engine.paths.config_file.parent / "keys.toml"
    keys.write_text('[keys]\n"jobs.start" = "f9"\n')
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("s")  # the old key no longer starts a job
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmModal)


async def test_a_long_past_log_loads_in_slices_and_is_bounded(engine: Engine) -> None:
    from guestsafe.tui.log_pane import MAX_LINES

    log_dir = engine.paths.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    big = log_dir / "20250101-000000-big.log"
    stamp = "2025-01-01T00:00:00+00:00"
    big.write_text("".join(f"{stamp} INFO web1 line {i}\n" for i in range(20000)))
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("l", "f")
        await wait_for(pilot, lambda: app.log_pane.current == big)
        view = app.query_one("#log-view")
        await wait_for(pilot, lambda: bool(view.lines) and "line 19999" in view.lines[-1].text)
        assert len(view.lines) <= MAX_LINES
        await pilot.press("j")
        assert app.active_tab == "jobs"


async def test_recovery_runs_at_start_and_says_what_it_did(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from guestsafe.engine.events import LogLine

    calls: list[str] = []

    def recover(reporter: Any) -> list[str]:
        calls.append("recover")
        reporter(
            LogLine(
                logging.INFO, "recovered: guest started again after an interrupted backup", "web1"
            )
        )
        return ["web1"]

    monkeypatch.setattr(engine, "recover", recover)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert calls == ["recover"]
        assert any("Recovered after an interrupted run: web1" in n for n in notifications(app))
        assert app.active_tab == "log"
        shown = " ".join(line.text for line in app.query_one("#log-view").lines)
        assert "web1: recovered: guest started again" in shown


async def test_an_unexpected_exception_is_an_error_modal_not_a_traceback(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("libvirt went away")

    monkeypatch.setattr(engine, "guests", broken)
    app = GuestsafeApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorModal)
        text = str(app.screen.query_one("#error-message", Static).render())
        assert text == "RuntimeError: libvirt went away"
        assert app.is_running
