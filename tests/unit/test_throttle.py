"""Gentle on the host: the token bucket (on a made-up clock) and the copier's I/O class."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from guestsafe.engine.copier import copy_file
from guestsafe.engine.throttle import HostPacer, TokenBucket, thread_io_priority

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("rate", "batch"), [(50 * MiB, 16 * MiB), (1 * MiB, 64 * 1024)])
def test_a_steady_writer_is_held_to_the_rate(rate: int, batch: int) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, clock=clock)
    start, written = clock.now, 0
    for _ in range(200):
        written += batch
        clock.now += 0.001  # the write itself, far faster than the cap
        clock.now += bucket.delay(batch)
    ratio = written / (clock.now - start) / rate
    assert 0.98 <= ratio <= 1.0 + 1e-9


def test_two_writers_share_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(10 * MiB, clock=clock)
    # Both write 1 MiB at the same moment: the second waits for both.
    assert bucket.delay(MiB) == pytest.approx(0.1)
    assert bucket.delay(MiB) == pytest.approx(0.2)


def test_a_pause_earns_a_burst_no_more() -> None:
    clock = Clock()
    bucket = TokenBucket(8 * MiB, clock=clock)  # burst: a quarter second, 2 MiB
    clock.now += 60  # a minute of holes or a slow read
    assert bucket.delay(2 * MiB) == 0.0  # the burst goes at once
    assert bucket.delay(8 * MiB) == pytest.approx(1.0)  # then the rate again
    assert bucket.delay(0) == pytest.approx(1.0)


def test_a_slow_writer_never_waits() -> None:
    clock = Clock()
    bucket = TokenBucket(10 * MiB, clock=clock)
    for _ in range(10):
        clock.now += 1.0  # 1 MiB a second, a tenth of the cap
        assert bucket.delay(MiB) == 0.0


def test_the_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def test_a_stopped_wait_returns_at_once() -> None:
    pacer = HostPacer("best-effort", 1 * MiB)
    stop = threading.Event()
    stop.set()
    pacer.wrote(100 * MiB, stop)  # a hundred seconds' worth, but stop is set: no wait


class Recording(HostPacer):
    """A HostPacer that notes each copy thread's I/O priority once it has set it."""

    def __init__(self, io_class: str) -> None:
        super().__init__(io_class, None)
        self.seen: list[tuple[str, tuple[int, int] | None]] = []
        self.lock = threading.Lock()

    def thread_started(self) -> None:
        super().thread_started()
        with self.lock:
            self.seen.append((threading.current_thread().name, thread_io_priority()))


@pytest.mark.parametrize(("io_class", "priority"), [("idle", (3, 0)), ("best-effort", (2, 4))])
def test_copy_threads_run_in_the_jobs_io_class(
    tmp_path: Path, io_class: str, priority: tuple[int, int]
) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(3 * MiB))
    before = thread_io_priority()
    pacer = Recording(io_class)
    copy_file(src, tmp_path / "copy.raw", pace=pacer)
    assert (tmp_path / "copy.raw").read_bytes() == src.read_bytes()
    assert pacer.refused is None
    names = sorted(name for name, _ in pacer.seen)
    assert names == [
        "guestsafe-copy-chunks",  # the chunk table, hashed beside the whole-file digest
        "guestsafe-copy-hash",
        *["guestsafe-copy-read"] * 2,
        *["guestsafe-copy-write"] * 2,
    ]
    assert {p for _, p in pacer.seen} == {priority}
    assert thread_io_priority() == before  # the caller's own thread keeps its class
