"""Keeping a backup gentle on its host: an I/O class for the copier, and a cap on its rate.

``HostPacer`` is what the copier is handed (``copier.Pacer``): each of its
threads calls ``thread_started`` first, which puts that thread in the job's
I/O scheduling class (``ionice``), and the writers call ``wrote`` after each
batch, which holds them back to the job's ``bwlimit``.

The I/O class is set per thread with the ``ioprio_set`` system call (glibc has
no wrapper; ``IOPRIO_WHO_PROCESS`` with id 0 means the calling thread), so the
runner's own thread, the hooks it starts and a restore keep the default class.
Only schedulers that honour I/O priorities (BFQ, and mq-deadline in part) act
on it; where the call is refused the copy goes on in the default class.

The cap is a token bucket over the bytes written: a writer that has written
ahead of ``rate`` waits until the average is back at ``rate``; up to ``burst``
bytes may go at once after a pause. ``delay`` is the arithmetic alone, on an
injected clock, so it is tested without waiting.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable

IOPRIO_CLASS_SHIFT = 13
IOPRIO_WHO_PROCESS = 1
# Class and level: idle has no levels; best-effort's default level is 4.
IO_PRIORITIES = {"idle": (3, 0), "best-effort": (2, 4)}
# ioprio_set and ioprio_get by architecture (asm-generic numbers for arm64 and riscv).
_SYSCALLS = {
    "x86_64": (251, 252),
    "aarch64": (30, 31),
    "riscv64": (30, 31),
    "i686": (289, 290),
    "armv7l": (314, 315),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
}


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def set_thread_io_class(io_class: str) -> str | None:
    """Put the calling thread in ``io_class``; None, or why it could not be done."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or _LIBC is None:
        return f"ioprio_set is not known on {platform.machine()}"
    klass, level = IO_PRIORITIES[io_class]
    value = (klass << IOPRIO_CLASS_SHIFT) | level
    if _LIBC.syscall(numbers[0], IOPRIO_WHO_PROCESS, 0, value) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def thread_io_priority(tid: int = 0) -> tuple[int, int] | None:
    """(class, level) of thread ``tid`` (0: the caller), or None where it cannot be read."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or _LIBC is None:
        return None
    value = int(_LIBC.syscall(numbers[1], IOPRIO_WHO_PROCESS, tid))
    if value < 0:
        return None
    return value >> IOPRIO_CLASS_SHIFT, value & ((1 << IOPRIO_CLASS_SHIFT) - 1)


class TokenBucket:
    """At most ``rate`` bytes per second on average, ``burst`` at once after a pause."""

    def __init__(
        self, rate: int, *, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        # A quarter of a second's worth by default: smooth enough for a disk, and
        # a pause (a slow read, a hole) is not made up for by a long burst later.
        self.burst = rate // 4 if burst is None else burst
        self._clock = clock
        self._lock = threading.Lock()
        self._ready_at = clock()  # when the bytes taken so far have been paid for

    def delay(self, nbytes: int) -> float:
        """Take ``nbytes`` written; the seconds to wait before writing on."""
        with self._lock:
            now = self._clock()
            # Idle time earns at most ``burst`` bytes of credit.
            start = max(self._ready_at, now - self.burst / self.rate)
            self._ready_at = start + nbytes / self.rate
            return max(0.0, self._ready_at - now)


class HostPacer:
    """The copier's pacing for one job: its ``ionice`` class and its ``bwlimit``."""

    def __init__(self, io_class: str, bwlimit: int | None) -> None:
        self.io_class = io_class
        self.rate = bwlimit or None
        self.bucket = TokenBucket(bwlimit) if bwlimit else None
        self.refused: str | None = None  # why the I/O class could not be set, if it was not

    def thread_started(self) -> None:
        problem = set_thread_io_class(self.io_class)
        if problem is not None:
            self.refused = problem

    def wrote(self, nbytes: int, stop: threading.Event) -> None:
        """Hold the writer back to the cap; returns early once ``stop`` is set."""
        if self.bucket is not None:
            stop.wait(self.bucket.delay(nbytes))
