"""Next runs (held against systemd-analyze), timer units, and run-due's bookkeeping."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from rig import require

from guestsafe.engine.api import Engine
from guestsafe.engine.errors import ConfigError
from guestsafe.engine.jobs import timers
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.jobs.schedule import (
    ScheduleState,
    local_zone,
    next_run,
    on_calendar,
    previous_run,
    read_state,
    run_due,
    write_state,
)
from guestsafe.engine.jobs.timers import (
    UNIT_MARKER,
    UnitSettings,
    install_timers,
    remove_timers,
    render_units,
    timer_state,
    timers_installed,
)
from guestsafe.engine.paths import Paths

ZURICH = ZoneInfo("Europe/Zurich")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(autouse=True)
def zurich(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's zone for every test here, as systemd would read it."""
    monkeypatch.setenv("TZ", "Europe/Zurich")


def _job(
    name: str = "nightly", time: str | None = "02:00", weekdays: list[str] | None = None
) -> Job:
    return Job(name, ["web1"], Path("/srv/backup"), schedule=Schedule(time, weekdays or []))


def _at(text: str, zone: ZoneInfo = ZURICH) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone)


# --- next run ----------------------------------------------------------------


def test_next_run_is_strictly_after_now() -> None:
    job = _job(time="02:00")
    assert next_run(job, _at("2024-05-10 01:59")) == _at("2024-05-10 02:00")
    assert next_run(job, _at("2024-05-10 02:00")) == _at("2024-05-11 02:00")
    assert previous_run(job, _at("2024-05-10 02:00")) == _at("2024-05-10 02:00")
    assert previous_run(job, _at("2024-05-10 01:59")) == _at("2024-05-09 02:00")


def test_weekdays_pick_the_next_listed_day() -> None:
    job = _job(time="23:30", weekdays=["mon", "fri"])  # 2024-05-10 is a Friday
    assert next_run(job, _at("2024-05-10 23:31")) == _at("2024-05-13 23:30")
    assert previous_run(job, _at("2024-05-13 12:00")) == _at("2024-05-10 23:30")


def test_manual_job_has_no_run() -> None:
    assert next_run(_job(time=None)) is None
    assert previous_run(_job(time=None)) is None
    assert on_calendar(_job(time=None)) is None


def test_next_run_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_run(_job(), datetime(2024, 5, 10, 1, 0))


def test_spring_forward_skips_the_missing_time() -> None:
    # 2024-03-31 02:00-03:00 does not exist in Zurich; systemd skips that day.
    job = _job(time="02:30")
    assert next_run(job, _at("2024-03-30 12:00")) == _at("2024-04-01 02:30")
    assert next_run(_job(time="03:00"), _at("2024-03-30 12:00")) == _at("2024-03-31 03:00")


def test_fall_back_runs_once_at_the_first_occurrence() -> None:
    job = _job(time="02:30")
    first = next_run(job, _at("2024-10-26 12:00"))
    assert first is not None and first.utcoffset() == timedelta(hours=2)  # CEST
    # From between the two 02:30s, the next run is the next day's.
    between = datetime(2024, 10, 27, 0, 45, tzinfo=UTC)
    assert next_run(job, between) == _at("2024-10-28 02:30")


def test_on_calendar() -> None:
    assert on_calendar(_job(time="02:00")) == "*-*-* 02:00:00"
    # Day order follows the week, whatever order the job lists them in.
    assert on_calendar(_job(time="07:05", weekdays=["sun", "mon"])) == "Mon,Sun *-*-* 07:05:00"


def test_local_zone_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Zurich")
    assert local_zone() == ZURICH
    monkeypatch.setenv("TZ", ":America/New_York")
    assert local_zone() == ZoneInfo("America/New_York")
    monkeypatch.setenv("TZ", "")
    assert local_zone() is UTC
    monkeypatch.delenv("TZ")
    assert local_zone().utcoffset(datetime(2024, 1, 1)) is not None


# --- against systemd -----------------------------------------------------------

SCHEDULES = [
    ("02:00", []),
    ("02:30", []),  # missing on spring-forward day, twice on fall-back day
    ("02:30", ["sun"]),  # both DST changes fall on a Sunday
    ("00:00", ["mon", "wed", "fri"]),
    ("23:59", ["sat"]),
    ("03:00", ["sun", "mon"]),
]
BASES = [
    "2024-03-29T12:00:00+00:00",  # two days before spring-forward
    "2024-03-31T00:45:00+00:00",  # the night of the change itself
    "2024-10-26T12:00:00+00:00",
    "2024-10-27T00:45:00+00:00",  # between the two 02:30s of fall-back night
    "2025-12-31T23:30:00+00:00",  # the year turns
]
# "(in UTC): Mon 2024-04-01 00:30:00 UTC", or for TZ=UTC the elapse line itself.
_UTC_LINE = re.compile(
    r"(?:\(in UTC\)|Next elapse|Iter\. #\d+): \w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC$",
    re.MULTILINE,
)


def _systemd_times(spec: str, base: datetime, zone: str, count: int) -> list[datetime]:
    proc = subprocess.run(
        [
            str(SYSTEMD_ANALYZE),
            "calendar",
            f"--iterations={count}",
            f"--base-time=@{int(base.timestamp())}",
            spec,
        ],
        env={**os.environ, "TZ": zone},
        capture_output=True,
        text=True,
        check=True,
    )
    found = _UTC_LINE.findall(proc.stdout)
    return [datetime.fromisoformat(t).replace(tzinfo=UTC) for t in found]


def _our_times(job: Job, base: datetime, zone: ZoneInfo, count: int) -> list[datetime]:
    times: list[datetime] = []
    now = base
    for _ in range(count):
        when = next_run(job, now, zone)
        assert when is not None
        times.append(when.astimezone(UTC))
        now = when
    return times


@pytest.mark.parametrize("zone", ["Europe/Zurich", "America/New_York", "UTC"])
def test_next_runs_agree_with_systemd_analyze_calendar(zone: str) -> None:
    require(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    for time_, weekdays in SCHEDULES:
        job = _job(time=time_, weekdays=weekdays)
        spec = on_calendar(job)
        assert spec is not None
        for base_text in BASES:
            base = datetime.fromisoformat(base_text)
            expected = _systemd_times(spec, base, zone, 6)
            assert len(expected) == 6, (spec, base_text)
            ours = _our_times(job, base, ZoneInfo(zone), 6)
            assert ours == expected, (zone, spec, base_text)


def test_local_zone_agrees_with_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zone comes from TZ for both: the same spec under TZ gives the same times."""
    require(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    monkeypatch.setenv("TZ", "Europe/Zurich")
    job = _job(time="02:30", weekdays=["sun"])
    base = datetime(2024, 3, 20, tzinfo=UTC)
    expected = _systemd_times("Sun *-*-* 02:30:00", base, "Europe/Zurich", 3)
    assert _our_times(job, base, ZoneInfo("Europe/Zurich"), 3) == expected
    assert next_run(job, base) == expected[0]  # zone=None: the host's, here TZ


# --- units ---------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> UnitSettings:
    config = tmp_path / "conf dir %h $HOME" / "jobs.toml"
    return UnitSettings(timers.find_program(), config, "qemu:///system", home=str(tmp_path))


def _verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path, settings: UnitSettings) -> None:
    require(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    unit_dir = tmp_path / "units"
    job = _job("web.v2_nightly-1", time="02:30", weekdays=["mon", "fri"])
    job.schedule.randomized_delay = 600
    install_timers([job], settings, unit_dir, reload=False)
    timer, service = timers.unit_names(job.name)
    watch = [unit_dir / "guestsafe_timers.path", unit_dir / "guestsafe_timers.service"]
    proc = _verify(unit_dir / timer, unit_dir / service, *watch)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    text = (unit_dir / timer).read_text()
    for line in (
        "OnCalendar=Mon,Fri *-*-* 02:30:00",
        "Persistent=true",
        "RandomizedDelaySec=600",
        f"Unit={service}",
        "WantedBy=timers.target",
    ):
        assert line in text.splitlines()


def test_service_runs_this_guestsafe_with_the_config(settings: UnitSettings) -> None:
    units = render_units(_job(), settings)
    service = units["guestsafe-nightly.service"]
    [exec_line] = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    program = str(settings.program)
    assert Path(program).is_absolute() and os.access(program, os.X_OK)
    assert exec_line.startswith(f'ExecStart="{program}" "--connect" "qemu:///system" "--config" ')
    # % and $ are escaped for systemd, so the path arrives as it is.
    assert "conf dir %%h $$HOME/jobs.toml" in exec_line
    assert exec_line.endswith('"run" "nightly" "--wait"')  # case 16: timers wait
    assert f'Environment="GUESTSAFE_HOME={settings.home}"' in service
    assert "Type=oneshot" in service
    assert service.startswith(UNIT_MARKER)


def test_install_is_idempotent_and_enables(tmp_path: Path, settings: UnitSettings) -> None:
    unit_dir = tmp_path / "units"
    jobs = [_job("a"), _job("b", time=None)]
    first = install_timers(jobs, settings, unit_dir, reload=False)
    assert first.written == [
        "guestsafe-a.service",
        "guestsafe-a.timer",
        "guestsafe_timers.path",
        "guestsafe_timers.service",
    ]
    assert not first.reloaded
    link = unit_dir / "timers.target.wants" / "guestsafe-a.timer"
    assert link.is_symlink() and link.resolve() == (unit_dir / "guestsafe-a.timer").resolve()
    watch = unit_dir / "paths.target.wants" / "guestsafe_timers.path"
    assert watch.is_symlink() and watch.resolve() == (unit_dir / "guestsafe_timers.path").resolve()
    again = install_timers(jobs, settings, unit_dir, reload=False)
    assert again.written == [] and again.removed == []
    assert timer_state(jobs[0], unit_dir, settings) == "installed"
    assert timer_state(jobs[1], unit_dir, settings) == "manual"
    assert oct((unit_dir / "guestsafe-a.timer").stat().st_mode & 0o777) == "0o644"


def test_install_removes_stale_units_and_spares_foreign_ones(
    tmp_path: Path, settings: UnitSettings
) -> None:
    unit_dir = tmp_path / "units"
    install_timers([_job("a"), _job("b")], settings, unit_dir, reload=False)
    foreign = unit_dir / "guestsafe-mine.timer"
    foreign.write_text("[Timer]\nOnCalendar=daily\n")
    changes = install_timers([_job("a")], settings, unit_dir, reload=False)
    assert changes.removed == ["guestsafe-b.service", "guestsafe-b.timer"]
    assert not (unit_dir / "guestsafe-b.timer").exists()
    assert not (unit_dir / "timers.target.wants" / "guestsafe-b.timer").exists()
    assert foreign.exists()
    removed = remove_timers(unit_dir, reload=False)
    assert removed.removed == [
        "guestsafe-a.service",
        "guestsafe-a.timer",
        "guestsafe_timers.path",
        "guestsafe_timers.service",
    ]
    assert sorted(p.name for p in unit_dir.iterdir()) == [
        "guestsafe-mine.timer",
        "paths.target.wants",
        "timers.target.wants",
    ]
    assert list((unit_dir / "paths.target.wants").iterdir()) == []
    assert not timers_installed(unit_dir)


def test_watch_reinstalls_from_the_same_jobs_file(tmp_path: Path, settings: UnitSettings) -> None:
    units = timers.render_watch(settings, tmp_path / "units")
    path_unit = units["guestsafe_timers.path"]
    assert f"PathChanged={str(settings.config_file).replace('%', '%%')}" in path_unit
    assert "WantedBy=paths.target" in path_unit
    [exec_line] = [
        line for line in units["guestsafe_timers.service"].splitlines() if "ExecStart=" in line
    ]
    assert exec_line.endswith(f'"schedule" "install" "--unit-dir" "{tmp_path / "units"}"')
    # A job called "timers" does not clash with the watch.
    assert timers.unit_names("timers") == ("guestsafe-timers.timer", "guestsafe-timers.service")


def test_changed_job_makes_its_timer_outdated(tmp_path: Path, settings: UnitSettings) -> None:
    unit_dir = tmp_path / "units"
    install_timers([_job("a")], settings, unit_dir, reload=False)
    assert timer_state(_job("a", time="03:00"), unit_dir, settings) == "outdated"
    assert timer_state(_job("c"), unit_dir, settings) == "missing"


def test_systemd_is_told_only_when_it_runs(
    tmp_path: Path, settings: UnitSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(timers, "_systemctl", lambda *a, check=True: calls.append(a))
    unit_dir = tmp_path / "units"
    # Not systemd's own directory: no reload, whether systemd runs or not.
    assert not install_timers([_job("a")], settings, unit_dir).reloaded
    assert calls == []
    install_timers([_job("a"), _job("b")], settings, unit_dir, reload=True)
    assert calls == [("daemon-reload",), ("start", "guestsafe-b.timer")]
    calls.clear()
    install_timers([_job("a", time="04:00")], settings, unit_dir, reload=True)
    assert calls == [
        ("stop", "guestsafe-b.timer"),
        ("daemon-reload",),
        ("stop", "guestsafe-a.timer"),
        ("clean", "--what=state", "guestsafe-a.timer"),
        ("start", "guestsafe-a.timer"),
    ]
    calls.clear()
    remove_timers(unit_dir, reload=True)
    assert calls == [
        ("stop", "guestsafe-a.timer"),
        ("stop", "guestsafe_timers.path"),
        ("daemon-reload",),
    ]
    calls.clear()
    install_timers([_job("a")], settings, unit_dir / "fresh", reload=True)
    assert calls == [
        ("daemon-reload",),
        ("start", "guestsafe-a.timer"),
        ("start", "guestsafe_timers.path"),
    ]


def test_default_unit_dir_and_reload_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(timers.UNIT_DIR_ENV, raising=False)
    assert timers.default_unit_dir() == Path("/etc/systemd/system")
    monkeypatch.setenv(timers.UNIT_DIR_ENV, str(tmp_path))
    assert timers.default_unit_dir() == tmp_path
    monkeypatch.setattr(timers, "SYSTEMD_RUNNING", tmp_path / "absent")
    assert not timers._should_reload(Path("/etc/systemd/system"), None)
    monkeypatch.setattr(timers, "SYSTEMD_RUNNING", tmp_path)
    assert timers._should_reload(Path("/etc/systemd/system"), None)
    assert not timers._should_reload(tmp_path, None)


def test_unwritable_unit_dir_is_a_clear_error(tmp_path: Path, settings: UnitSettings) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot update timers in .*--unit-dir"):
        install_timers([_job()], settings, blocker / "units", reload=False)


# --- the engine keeps timers in step -------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    home = tmp_path / "home"
    paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    engine = Engine(uri="test:///default", paths=paths, unit_dir=tmp_path / "units")
    yield engine
    engine.close()


def test_editing_jobs_updates_installed_timers(engine: Engine) -> None:
    engine.save_job(_job("a"))
    assert not engine.unit_dir.exists()  # never installed: saving writes no timer
    engine.install_timers()
    engine.save_job(_job("b", time="03:15", weekdays=["tue"]))
    assert "OnCalendar=Tue *-*-* 03:15:00" in (engine.unit_dir / "guestsafe-b.timer").read_text()
    engine.save_job(_job("b2", time="04:00"), previous_name="b")
    assert not (engine.unit_dir / "guestsafe-b.timer").exists()
    assert (engine.unit_dir / "guestsafe-b2.timer").exists()
    engine.save_job(_job("a", time=None))
    assert not (engine.unit_dir / "guestsafe-a.timer").exists()
    engine.delete_job("b2")
    assert not timers_installed(engine.unit_dir)
    assert engine.timer_states() == {"a": "manual"}


def test_first_scheduled_job_installs_timers_where_systemd_runs(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(timers, "_systemctl", lambda *a, check=True: calls.append(a))
    monkeypatch.setattr(timers, "DEFAULT_UNIT_DIR", engine.unit_dir)
    monkeypatch.setattr(timers, "SYSTEMD_RUNNING", tmp_path)  # exists: systemd runs
    engine.save_job(_job("manual", time=None))
    assert not timers_installed(engine.unit_dir) and calls == []
    engine.save_job(_job("a"))
    assert timer_state(_job("a"), engine.unit_dir) == "installed"
    assert calls[:2] == [("daemon-reload",), ("start", "guestsafe-a.timer")]


# --- run-due -------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_run_due_starts_from_the_first_sighting(tmp_path: Path) -> None:
    job = _job(time="02:00")
    ran: list[str] = []
    clock = Clock(_at("2024-05-10 14:00"))
    # A job made at 14:00 for 02:00 must not run at 14:01.
    assert run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock) == []
    clock.now = _at("2024-05-10 14:01")
    assert run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock) == []
    clock.now = _at("2024-05-11 02:00:30")
    done = run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock)
    assert [(d.job, d.due, d.ok) for d in done] == [("nightly", _at("2024-05-11 02:00"), True)]
    clock.now = _at("2024-05-11 02:01:30")
    assert run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock) == []
    assert ran == ["nightly"]


def test_missed_times_make_one_run(tmp_path: Path) -> None:
    job = _job(time="02:00")
    write_state(tmp_path, job, _at("2024-05-01 02:00"))
    ran: list[str] = []
    clock = Clock(_at("2024-05-10 08:00"))  # the host was off for a week
    done = run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock)
    assert [d.due for d in done] == [_at("2024-05-10 02:00")]
    run_due([job], tmp_path, lambda j: ran.append(j.name) is None, clock=clock)
    assert ran == ["nightly"]


def test_a_failed_run_is_not_retried_every_minute(tmp_path: Path) -> None:
    job = _job(time="02:00")
    write_state(tmp_path, job, _at("2024-05-09 02:00"))
    clock = Clock(_at("2024-05-10 02:00"))
    assert [d.ok for d in run_due([job], tmp_path, lambda j: False, clock=clock)] == [False]
    clock.now = _at("2024-05-10 02:01")
    assert run_due([job], tmp_path, lambda j: False, clock=clock) == []


def test_edited_schedule_starts_afresh(tmp_path: Path) -> None:
    write_state(tmp_path, _job(weekdays=["mon"]), _at("2024-05-06 02:00"))  # a Monday
    # On Wednesday noon the job becomes daily: Tuesday's and Wednesday's 02:00
    # passed since the last run, but neither was ever scheduled.
    ran: list[str] = []
    clock = Clock(_at("2024-05-08 12:00"))
    assert run_due([_job()], tmp_path, lambda j: ran.append(j.name) is None, clock=clock) == []
    clock.now = _at("2024-05-09 02:00")
    assert len(run_due([_job()], tmp_path, lambda j: ran.append(j.name) is None, clock=clock)) == 1


def test_manual_jobs_are_never_due(tmp_path: Path) -> None:
    clock = Clock(_at("2024-05-10 02:00"))
    assert run_due([_job(time=None)], tmp_path, lambda j: True, clock=clock) == []
    assert read_state(tmp_path, "nightly") is None


def test_damaged_state_starts_afresh(tmp_path: Path) -> None:
    job = _job()
    write_state(tmp_path, job, _at("2024-05-01 02:00"))
    (tmp_path / "schedule" / "nightly.json").write_text("{not json")
    assert read_state(tmp_path, "nightly") is None
    assert run_due([job], tmp_path, lambda j: True, clock=Clock(_at("2024-05-10 08:00"))) == []
    state = read_state(tmp_path, "nightly")
    assert state == ScheduleState(_at("2024-05-10 08:00").astimezone(UTC), "*-*-* 02:00:00")


def test_two_run_dues_at_once_start_a_job_once(tmp_path: Path) -> None:
    job = _job(time="02:00")
    write_state(tmp_path, job, _at("2024-05-09 02:00"))
    clock = Clock(_at("2024-05-10 02:00"))
    started = threading.Event()
    ran: list[str] = []

    def slow_run(j: Job) -> bool:
        ran.append(j.name)
        started.set()
        time.sleep(0.5)
        return True

    first = threading.Thread(
        target=run_due, args=([job], tmp_path, slow_run), kwargs={"clock": clock}
    )
    first.start()
    assert started.wait(5)
    # The second finds the job locked (being run) and skips it.
    assert run_due([job], tmp_path, slow_run, clock=clock) == []
    first.join()
    # Once the first is done the job is no longer due.
    assert run_due([job], tmp_path, slow_run, clock=clock) == []
    assert ran == ["nightly"]
