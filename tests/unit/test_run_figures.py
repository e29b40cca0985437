"""Issue 15: each figure of a run means one thing.

A guest's "in N s" is its own time, not the whole job's; its size is the data
copied, labelled so, beside the version's size on disk that ``list`` shows;
the job's last result knows how long the run took.
"""

from __future__ import annotations

import time
from pathlib import Path

from guestsafe.engine import demo
from guestsafe.engine.api import Engine


def test_each_guest_of_a_job_has_its_own_duration_and_copied_size(tmp_path: Path) -> None:
    engine = Engine.demo(demo.ensure_sandbox(tmp_path / "demo"))
    try:
        began = time.monotonic()
        result = engine.run_job("nightly")  # web1, then db1
        took = time.monotonic() - began
        assert result.ok, result.outcomes
        web1, db1 = result.outcomes
        # Before, each guest said the job's whole time: their sum was twice the run.
        assert web1.duration + db1.duration <= took + 0.05
        assert web1.duration > 0 and db1.duration > 0
        for outcome in result.outcomes:
            assert f"copied in {outcome.duration:.1f} s" in outcome.message
        last = engine.last_results()["nightly"]
        assert last.seconds is not None and 0 <= last.seconds <= took + 1
    finally:
        engine.close()
