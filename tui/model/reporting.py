"""A Reporter for engine calls made from a worker thread.

The engine may report thousands of progress events a second. Posting each one
would flood the UI thread, so events are gathered and handed on in batches at
most every ``interval`` seconds, keeping only the newest progress of each item.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from guestsafe.engine.events import Event, Progress

BATCH_INTERVAL = 0.2


class BatchingReporter:
    def __init__(
        self,
        deliver: Callable[[list[Event]], None],
        *,
        interval: float = BATCH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver = deliver
        self._interval = interval
        self._clock = clock
        self._pending: list[Event] = []
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            last = self._pending[-1] if self._pending else None
            if (
                isinstance(event, Progress)
                and isinstance(last, Progress)
                and (last.guest, last.item) == (event.guest, event.item)
            ):
                self._pending[-1] = event
            else:
                self._pending.append(event)
            due = self._clock() - self._last >= self._interval
        if due:
            self.flush()

    def flush(self) -> None:
        """Hand on whatever is pending; call once more when the engine call returns."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._last = self._clock()
        if batch:
            self._deliver(batch)
