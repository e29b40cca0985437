"""Issue 12, recovery and power state: cases 7-13 and 21 that fakes can hold.

The real-guest halves are in tests/integration/test_recovery_cases.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from rig import require

from guestsafe.engine.jobs import timers
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.jobs.timers import UnitSettings, install_timers

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- case 13: the service's stop path ---------------------------------------------------


def _settings(tmp_path: Path) -> UnitSettings:
    return UnitSettings(timers.find_program(), tmp_path / "jobs.toml", "qemu:///system")


def test_case_13_service_stops_by_cancelling_and_recovers_after(tmp_path: Path) -> None:
    require(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    assert SYSTEMD_ANALYZE is not None
    job = Job("nightly", ["web1"], Path("/srv/backup"), schedule=Schedule("02:00", []))
    job.shutdown_timeout = 300
    unit_dir = tmp_path / "units"
    install_timers([job], _settings(tmp_path), unit_dir, reload=False)
    timer, service = timers.unit_names(job.name)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_dir / timer), str(unit_dir / service)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    lines = (unit_dir / service).read_text().splitlines()
    # SIGTERM to guestsafe alone: its handler cancels and starts the guest again.
    assert "KillMode=mixed" in lines and "KillSignal=SIGTERM" in lines
    [stop] = [line for line in lines if line.startswith("TimeoutStopSec=")]
    # Long enough for the cancelled run's hooks and a restart, never the 90 s default.
    assert int(stop.split("=")[1]) >= 4 * job.hooks.timeout + 120
    [post] = [line for line in lines if line.startswith("ExecStopPost=")]
    assert post.endswith('"recover"') and str(timers.find_program()) in post
    assert '"--config"' in post
