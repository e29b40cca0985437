"""Issue 16, hosts: snapshots of the Guests tab grouped by host and the job form's Hosts field.

The second host is libvirt's test driver (``test:///default``), whose one guest and
its MAC never change, so the picture is pinned as test_snapshots.py pins the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_snapshots as snaps
from textual.widgets import DataTable

from guestsafe.engine.api import Engine
from guestsafe.tui.job_form import JobFormScreen

pytestmark = pytest.mark.tui


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    snaps.freeze(monkeypatch)
    engine = Engine.demo(snaps.fresh_sandbox())
    snaps.write_fixed_result(engine)
    with engine.paths.config_file.open("a") as f:
        f.write('\n[hosts.t2]\nuri = "test:///default"\n')
    yield engine
    engine.close()


def _guest_rows(app: object) -> int:
    return int(app.query_one("#guests-table", DataTable).row_count)  # type: ignore[attr-defined]


def test_guests_grouped_by_host(snap_compare: snaps.Compare, engine: Engine) -> None:
    local = len(engine.guests())
    run_before = snaps.steps("g", until=lambda app: _guest_rows(app) >= local + 3)
    assert snap_compare(snaps.app_of(engine), terminal_size=snaps.WIDE, run_before=run_before)


def test_job_form_with_hosts(snap_compare: snaps.Compare, engine: Engine) -> None:
    run_before = snaps.steps("n", until=lambda app: isinstance(app.screen, JobFormScreen))
    assert snap_compare(snaps.app_of(engine), terminal_size=snaps.NARROW, run_before=run_before)
