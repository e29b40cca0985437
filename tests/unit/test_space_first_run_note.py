"""Item 2's notice in the log: a destination's first run says what its versions will be."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

from rig.scratch_fs import scratch_fs

from guestsafe.engine import demo
from guestsafe.engine.api import Engine


def _log_of_runs(engine: Engine, destination: Path) -> list[str]:
    job = replace(engine.job("nightly"), destination=destination)
    engine.save_job(job)
    logs = []
    for _ in range(2):
        result = engine.run_job("nightly")
        assert result.ok, result.outcomes
        logs.append(result.log_path.read_text())
    return logs


def test_the_first_run_on_ext4_says_full_copies_and_suggests_xfs(tmp_path: Path) -> None:
    engine = Engine.demo(demo.ensure_sandbox(tmp_path / "demo"))
    try:
        with scratch_fs(tmp_path, "ext4") as root:
            first, second = _log_of_runs(engine, root)
    finally:
        engine.close()
    assert "are full copies (no reflink there)" in first and "XFS or btrfs" in first
    assert "full copies" not in second  # said once, on the first run


def test_the_first_run_on_xfs_says_versions_share_blocks(tmp_path: Path) -> None:
    engine = Engine.demo(demo.ensure_sandbox(tmp_path / "demo"))
    try:
        with scratch_fs(tmp_path, "xfs") as root:
            first, second = _log_of_runs(engine, root)
            # The demo's disks did not change: the second version takes the first's
            # whole-file digests, and b3sum, which knows nothing of that, agrees.
            sums = sorted(root.rglob("2/B3SUMS"))
            assert sums
            for path in sums:
                subprocess.run(["b3sum", "--check", "B3SUMS"], cwd=path.parent, check=True,
                               capture_output=True)  # fmt: skip
    finally:
        engine.close()
    assert "share unchanged blocks (reflink)" in first
    assert "unchanged since version 1, nothing written" in second
