"""qcow2 backing chains: what ``qemu-img`` says a disk is made of, and rewriting it.

A qcow2 overlay holds only what was written since it was created; every read
of a cluster it lacks falls through to its backing file, and so on down the
chain. Saving the overlay alone would not restore, so a backup either flattens
the chain (``qemu-img convert``) or archives every file of it, each rewritten
to name its backing file by its name inside the version (``qemu-img rebase -u``).

``qemu-img info --backing-chain`` is asked rather than the header read by hand:
it resolves relative names, json: pseudo-files and every format the way QEMU
itself will when the guest starts.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestsafe.engine.errors import Cancelled, CopyError, PreflightError
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo

QEMU_IMG = "qemu-img"
# Formats a layer may have: what the copier and qemu-img rebase -u handle as plain files.
LAYER_FORMATS = ("qcow2", "raw")
INFO_TIMEOUT = 60.0


@dataclass(frozen=True)
class Layer:
    """One file of a disk's chain: its path, format, and the next file down (None: the base)."""

    path: Path
    format: str
    backing: Path | None
    allocated: int  # bytes on the host's disk (qemu-img's actual-size)


class ChainError(Exception):
    """qemu-img could not read the chain; the message says why."""


def _run(args: list[str], timeout: float = INFO_TIMEOUT) -> str:
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise ChainError(f"{QEMU_IMG} is not installed (Debian package qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ChainError(f"{QEMU_IMG} {args[0]} did not answer within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ChainError(lines[-1] if lines else f"{QEMU_IMG} {args[0]} failed")
    return proc.stdout


def backing_chain(path: Path, fmt: str = "qcow2") -> list[Layer]:
    """The files a qcow2 disk reads, top first; one layer for a standalone image.

    ``-U`` (force share): preflight asks while the guest still runs and QEMU
    holds the image's lock; reading the headers is safe meanwhile.
    """
    # -f: the top file's format is libvirt's, never probed from bytes a guest wrote.
    out = _run(["info", "--backing-chain", "--output=json", "-U", "-f", fmt, str(path)])
    try:
        images: Any = json.loads(out)
    except ValueError as exc:
        raise ChainError(f"{QEMU_IMG} info gave no JSON for {path}") from exc
    if isinstance(images, dict):  # a qemu-img that prints one image without a list
        images = [images]
    layers = []
    for image in images:
        backing = image.get("full-backing-filename") or image.get("backing-filename")
        layers.append(
            Layer(
                path=Path(os.path.abspath(image["filename"])),
                format=str(image.get("format", "raw")),
                backing=Path(os.path.abspath(backing)) if backing else None,
                allocated=int(image.get("actual-size") or 0),
            )
        )
    return layers


def disk_chain(disk: DiskInfo) -> list[Layer] | None:
    """The chain of a backed-up qcow2 file disk if it has more than one file, else None."""
    if not disk.backs_up or disk.kind != "file" or disk.format != "qcow2" or not disk.source:
        return None
    layers = backing_chain(Path(disk.source))
    return layers if len(layers) > 1 else None


def check_chain(guest: str, disk: DiskInfo) -> list[Layer] | None:
    """Refuse a chain a backup cannot save whole; its layers otherwise (None: no chain)."""
    try:
        layers = disk_chain(disk)
    except ChainError as exc:
        raise PreflightError(
            f"guest {guest!r}: disk {disk.target} ({disk.source}): qemu-img cannot open its "
            f"backing chain ({exc}); a backing file missing or moved cannot be backed up"
        ) from exc
    if layers is None:
        return None
    for layer in layers[1:]:
        problem = _layer_problem(layer)
        if problem is not None:
            raise PreflightError(
                f"guest {guest!r}: disk {disk.target} ({disk.source}) is an overlay whose "
                f"backing file {layer.path} {problem}; guestsafe saves chains of plain "
                "qcow2 and raw files only (flatten it with 'virsh blockpull' first)"
            )
    return layers


def _layer_problem(layer: Layer) -> str | None:
    if layer.format not in LAYER_FORMATS:
        return f"is {layer.format}"
    try:
        st = os.stat(layer.path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def check_chains(info: GuestInfo) -> dict[str, list[Layer]]:
    """Every backed-up disk's chain, by target; refuses those that cannot be saved."""
    chains = {}
    for disk in info.disks:
        layers = check_chain(info.name, disk)
        if layers is not None:
            chains[disk.target] = layers
    return chains


def backing_allocated(info: GuestInfo) -> int:
    """Bytes the backing files (not the tops) of the guest's disks take on the host."""
    total = 0
    for disk in info.disks:
        try:
            layers = disk_chain(disk)
        except ChainError:
            continue  # check_chains refuses it with the reason
        total += sum(layer.allocated for layer in (layers or [])[1:])
    return total


def rebase_unsafe(image: Path, backing: str, backing_format: str) -> None:
    """Make ``image`` name ``backing`` (relative to its own folder), data untouched."""
    try:
        _run(["rebase", "-u", "-f", "qcow2", "-b", backing, "-F", backing_format, str(image)])
    except ChainError as exc:
        raise CopyError(f"qemu-img rebase -u of {image} onto {backing} failed: {exc}") from exc


def convert_flat(
    source: Path,
    target: Path,
    *,
    progress: Callable[[int, int], None],
    total: int,
    cancel: threading.Event,
) -> None:
    """Write the whole chain under ``source`` into one standalone qcow2 at ``target``.

    qemu-img reads the chain as QEMU would; ``-p`` prints its progress as a
    percentage, passed on scaled to ``total``. A cancel kills it (the caller
    removes the half-written file).
    """
    args = [QEMU_IMG, "convert", "-p", "-f", "qcow2", "-O", "qcow2", str(source), str(target)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    assert proc.stdout is not None and proc.stderr is not None
    watcher = threading.Thread(target=_kill_on_cancel, args=(proc, cancel), daemon=True)
    watcher.start()
    buffer = b""
    while chunk := os.read(proc.stdout.fileno(), 256):
        buffer += chunk
        *done, buffer = buffer.replace(b"\n", b"\r").split(b"\r")
        for line in done:
            percent = _percent(line)
            if percent is not None:
                progress(int(total * percent / 100), total)
    err = proc.stderr.read().decode(errors="replace").strip()
    code = proc.wait()
    watcher.join()
    if cancel.is_set():
        raise Cancelled(f"flattening {source} was cancelled")
    if code != 0:
        last = err.splitlines()[-1] if err else f"exit status {code}"
        raise CopyError(f"qemu-img convert of {source} to {target} failed: {last}")


def _percent(line: bytes) -> float | None:
    text = line.decode(errors="replace").strip().strip("()")
    if not text.endswith("/100%"):
        return None
    try:
        return float(text.split("/", 1)[0])
    except ValueError:
        return None


def _kill_on_cancel(proc: subprocess.Popen[bytes], cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.is_set():
            proc.kill()
            return
        threading.Event().wait(0.2)
