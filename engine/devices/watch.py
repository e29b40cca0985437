"""Watching for devices plugged in and removed (udev and the mount table).

``DeviceWatcher`` runs a thread on a udev netlink monitor and on the kernel's
mount-table notification (``/proc/self/mountinfo`` signals POLLPRI), so it never
polls the tree: each burst of events is followed by one fresh listing, and the
callback hears what was added and removed, well within a second.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyudev

from guestsafe.engine.devices.mountinfo import MOUNTINFO
from guestsafe.engine.devices.udev import BlockDevice, list_devices
from guestsafe.engine.errors import DeviceError

# How long the watcher waits for a burst of udev events to end before listing.
SETTLE_SECONDS = 0.15
# ...but never longer than this after the first event, so a device shows in time.
MAX_DELAY_SECONDS = 0.6


@dataclass(frozen=True)
class DevicesChanged:
    """What the watcher saw change; ``devices`` is the whole list afterwards."""

    added: tuple[BlockDevice, ...]
    removed: tuple[BlockDevice, ...]
    devices: tuple[BlockDevice, ...]


def _key(device: BlockDevice) -> tuple[str, str, str, str, bool]:
    return (device.node, device.uuid, device.fstype, device.label, device.locked)


def diff(before: Sequence[BlockDevice], after: Sequence[BlockDevice]) -> DevicesChanged:
    old = {_key(d): d for d in before}
    new = {_key(d): d for d in after}
    return DevicesChanged(
        added=tuple(d for k, d in new.items() if k not in old),
        removed=tuple(d for k, d in old.items() if k not in new),
        devices=tuple(after),
    )


class DeviceWatcher:
    """Reports devices added and removed; ``callback`` runs on the watcher's thread.

    Use as a context manager, or ``start()`` and ``stop()``. The callback hears
    only real changes to the list, never a burst of udev noise, and must not
    block for long. An exception in it is kept in ``last_error``, not raised.
    """

    def __init__(
        self,
        callback: Callable[[DevicesChanged], None],
        *,
        lister: Callable[[], list[BlockDevice]] | None = None,
    ) -> None:
        self._callback = callback
        self._context = pyudev.Context()
        self._lister = lister or (lambda: list_devices(self._context))
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stop = threading.Event()
        self.devices: list[BlockDevice] = []
        self.last_error: BaseException | None = None

    def start(self) -> DeviceWatcher:
        if self._thread is not None:
            return self
        try:
            monitor = pyudev.Monitor.from_netlink(self._context)
            monitor.filter_by("block")
            monitor.start()
        except (OSError, pyudev.DeviceNotFoundError) as exc:
            raise DeviceError(
                f"cannot watch for devices: no udev monitor ({exc}); is systemd-udevd running?"
            ) from exc
        self.devices = self._lister()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(
            target=self._run, args=(monitor,), name="guestsafe-devices", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> DeviceWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, monitor: pyudev.Monitor) -> None:
        with open(MOUNTINFO, "rb") as mountinfo:
            poller = select.poll()
            poller.register(monitor.fileno(), select.POLLIN)
            # The kernel flags the mount table with POLLPRI|POLLERR when it changes.
            poller.register(mountinfo.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(self._wake_r, select.POLLIN)
            while not self._stop.is_set():
                if self._wait_for_burst(poller, monitor) and not self._stop.is_set():
                    self._relist()

    def _wait_for_burst(self, poller: select.poll, monitor: pyudev.Monitor) -> bool:
        """Block until something happens, then until it has been quiet a moment."""
        first: float | None = None
        timeout: float | None = None
        while not self._stop.is_set():
            ready = poller.poll(None if timeout is None else timeout * 1000)
            if not ready:
                return True  # quiet after a burst
            for _ in _drain(monitor):
                pass
            now = time.monotonic()
            first = now if first is None else first
            timeout = max(0.0, min(SETTLE_SECONDS, first + MAX_DELAY_SECONDS - now))
            if timeout == 0.0:
                return True
        return False

    def _relist(self) -> None:
        try:
            after = self._lister()
        except (OSError, DeviceError, pyudev.DeviceNotFoundError):
            return  # a device vanished while listed; the next event lists again
        change = diff(self.devices, after)
        self.devices = after
        if change.added or change.removed:
            try:
                self._callback(change)
            except Exception as exc:  # the consumer's bug must not stop the watching
                self.last_error = exc


class ManualWatcher(DeviceWatcher):
    """A watcher fed by hand instead of udev: the demo sandbox's, and tests' hot-plug."""

    def __init__(
        self, callback: Callable[[DevicesChanged], None], devices: Sequence[BlockDevice]
    ) -> None:
        super().__init__(callback, lister=lambda: list(self._fed))
        self._fed = list(devices)

    def start(self) -> ManualWatcher:
        self.devices = list(self._fed)
        return self

    def stop(self) -> None:
        pass

    def set_devices(self, devices: Sequence[BlockDevice]) -> None:
        """Report the change to ``devices`` as udev events would (on the caller's thread)."""
        self._fed = list(devices)
        self._relist()


def _drain(monitor: pyudev.Monitor) -> Iterator[Any]:
    while True:
        try:
            dev = monitor.poll(timeout=0)
        except OSError:
            return
        if dev is None:
            return
        yield dev
