"""Issue 16, hosts: the job form offers the hosts of jobs.toml, the restore form a target host."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.message import Message
from textual.widgets import Input, Static
from tui_support import settle, wait_for

from guestsafe.engine.api import Engine
from guestsafe.tui.app import GuestsafeApp
from guestsafe.tui.job_form import JobFormScreen
from guestsafe.tui.restore_form import RestoreForm

pytestmark = pytest.mark.tui


def _add_host(engine: Engine) -> None:
    with engine.paths.config_file.open("a") as f:
        f.write('\n[hosts.t2]\nuri = "test:///default"\n')


async def _open_form(app: GuestsafeApp, pilot: object) -> JobFormScreen:
    await settle(pilot)  # type: ignore[arg-type]
    await pilot.press("n")  # type: ignore[attr-defined]
    await wait_for(pilot, lambda: isinstance(app.screen, JobFormScreen))  # type: ignore[arg-type]
    await settle(pilot)  # type: ignore[arg-type]
    assert isinstance(app.screen, JobFormScreen)
    return app.screen


async def test_without_hosts_the_job_form_has_no_hosts_field(engine: Engine) -> None:
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        form = await _open_form(app, pilot)
        assert not form.query("#f-hosts")


def _errors(form: JobFormScreen) -> dict[str, str]:
    found = {}
    for static in form.query(".field-error").results(Static):
        text = str(static.render()).strip()
        if text and static.display:
            found[static.id or ""] = text
    return found


async def test_a_job_saved_with_a_host_backs_up_that_hosts_guests(
    engine: Engine, tmp_path: Path
) -> None:
    _add_host(engine)
    destination = tmp_path / "dest"
    destination.mkdir(mode=0o700)
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        form = await _open_form(app, pilot)
        hosts = form.query_one("#f-hosts", Input)
        assert "local, t2" in hosts.placeholder
        form.query_one("#f-name", Input).value = "remote"
        form.query_one("#f-guests", Input).value = "test"  # the test driver's guest
        form.query_one("#f-destination", Input).value = str(destination)
        hosts.value = "node9"
        await settle(pilot)
        assert "not defined" in _errors(form).get("e-hosts", ""), _errors(form)
        hosts.value = "t2"
        await settle(pilot)
        assert "e-hosts" not in _errors(form), _errors(form)
        await pilot.press("f2")
        await settle(pilot)
        assert not isinstance(app.screen, JobFormScreen), _errors(form)
    job = engine.job("remote")
    assert job.hosts == ["t2"] and job.guests == ["test"]


async def test_the_restore_form_offers_the_hosts_and_refuses_an_unknown_one(
    engine: Engine,
) -> None:
    _add_host(engine)
    app = GuestsafeApp(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        form = app.query_one(RestoreForm)
        host = form.query_one("#r-host", Input)
        assert "local, t2" in host.placeholder
        submitted: list[RestoreForm.Submitted] = []
        passed_on = form.post_message

        def spy(message: Message) -> bool:
            # The form's own submissions are kept, not acted on; the rest go their way.
            if isinstance(message, RestoreForm.Submitted):
                submitted.append(message)
                return True
            return passed_on(message)

        form.post_message = spy  # type: ignore[method-assign]
        form.prefill("node2/web1", 3)
        assert form.query_one("#r-new", Input).value == "web1-v3"  # no host in the new name
        host.value = "node9"
        form.submit()
        assert not submitted
        assert "node9" in str(form.query_one("#r-error", Static).render())
        host.value = "t2"
        form.submit()
        assert [(s.guest, s.number, s.to_host) for s in submitted] == [("node2/web1", 3, "t2")]
