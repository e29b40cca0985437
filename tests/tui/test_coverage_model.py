"""The Jobs column of ``guestsafe guests`` and the Guests tab: who backs each guest up."""

from __future__ import annotations

from pathlib import Path

from guestsafe.engine.api import GuestInfo, Job
from guestsafe.engine.hypervisor.domain_xml import GuestState
from guestsafe.tui.model.coverage import NO_BACKUP, coverage


def _guest(name: str, persistent: bool = True) -> GuestInfo:
    return GuestInfo(name, f"uuid-{name}", GuestState.RUNNING, persistent)


def test_each_guest_names_its_jobs_and_a_guest_in_none_is_marked(tmp_path: Path) -> None:
    jobs = [
        Job("nightly", ["web1"], tmp_path),
        Job("everything", [], tmp_path, all_guests=True, exclude=["scratch-*"]),
        Job("db", ["db1"], tmp_path),
    ]
    guests = [_guest("web1"), _guest("db1"), _guest("scratch-1"), _guest("temp", persistent=False)]

    covered = coverage(jobs, guests)

    assert covered["web1"].label == "nightly,everything"
    assert covered["web1"].first is jobs[0]
    assert covered["db1"].label == "everything,db"
    assert covered["scratch-1"].label == "- (excluded)" and not covered["scratch-1"].uncovered
    assert covered["temp"].label == "- (transient)" and covered["temp"].first is None


def test_a_guest_defined_after_every_job_shows_no_backup(tmp_path: Path) -> None:
    covered = coverage([Job("nightly", ["web1"], tmp_path)], [_guest("web1"), _guest("new")])

    assert covered["new"].uncovered and covered["new"].label == NO_BACKUP
    assert covered["new"].first is None
    assert not covered["web1"].uncovered
