"""A disk on a qcow2 backing chain, copied cold into a version (the job's ``chain``).

``flatten`` (the default): ``qemu-img convert`` writes one standalone qcow2
holding the data of every layer, then the copier's hash reads it back. The
copier cannot hash while copying here, because the bytes written are not the
bytes read: qemu-img makes a new image out of several files, and only it knows
how. Reading the result back is also a cold check of what landed on the disk.

``keep``: every file of the chain is copied as it is (the copier hashes while
copying), then each overlay's copy is rebased unsafely (``qemu-img rebase -u``,
header only) onto the name its backing file has inside the version, so the
version folder alone is bootable. A rebased file is hashed again, since its
header changed after the copier hashed it.
"""

from __future__ import annotations

import os
import threading

from guestsafe.engine.archive.manifest import ChainFile, DiskRecord
from guestsafe.engine.archive.partial import PartialVersion
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.copier import ChunkTable, copy_file, hash_with_chunks
from guestsafe.engine.errors import CopyError, naming
from guestsafe.engine.fsutil import fsync_file
from guestsafe.engine.hypervisor import chains, disk_files
from guestsafe.engine.hypervisor.chains import Layer
from guestsafe.engine.hypervisor.domain_xml import DiskInfo
from guestsafe.engine.modes import ChainMode


def layer_file_name(target: str, depth: int, fmt: str) -> str:
    """The name of a chain's file in a version: ``vda.qcow2`` on top, ``vda.1.qcow2`` below."""
    if depth == 0:
        return disk_files.archive_file_name(target, fmt)
    return f"{target}.{depth}.{fmt}"


def copy_chain(
    run: GuestRun,
    disk: DiskInfo,
    layers: list[Layer],
    mode: ChainMode,
    cancel: threading.Event,
) -> DiskRecord:
    """The disk's chain in the partial version, as ``mode`` says; its manifest record."""
    assert run.partial is not None and disk.source is not None
    described = " <- ".join(str(layer.path) for layer in reversed(layers))
    if mode == ChainMode.KEEP:
        run.say_info(f"copying {disk.target}, a chain of {len(layers)} files ({described})")
        return _keep(run, run.partial, disk, layers, cancel)
    run.say_info(f"flattening {disk.target}, a chain of {len(layers)} files ({described})")
    record = _flatten(run, run.partial, disk, layers, cancel)
    run.note(f"{disk.target}: flattened from a chain of {len(layers)} files ({described})")
    return record


def _flatten(
    run: GuestRun,
    partial: PartialVersion,
    disk: DiskInfo,
    layers: list[Layer],
    cancel: threading.Event,
) -> DiskRecord:
    name = disk_files.archive_file_name(disk.target, "qcow2")
    dst = partial.file_path(name)
    top = layers[0].path
    with naming("reading the disk size of", top):
        total = disk_files.virtual_size(top, "qcow2")
    progress = run.copy_progress(disk.target)
    try:
        chains.convert_flat(top, dst, progress=progress, total=total, cancel=cancel)
        os.chmod(dst, 0o600)  # as the copier leaves its files: a disk is private
        with naming("flushing", dst):
            fsync_file(dst)  # qemu-img convert writes without flushing
        run.say_info(f"hashing {disk.target} ({name}, written by qemu-img)")
        hashed = hash_with_chunks(dst, progress=progress, cancel=cancel)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    with naming("reading the copy", dst):
        allocated = dst.stat().st_blocks * 512
        run.bytes_copied += allocated
        return DiskRecord(
            target=disk.target,
            source=disk.source or str(top),
            format="qcow2",
            virtual_size=disk_files.virtual_size(dst, "qcow2"),
            allocated_size=allocated,
            file=name,
            blake3=hashed.blake3,
            chunks=partial.write_chunk_table(name, hashed.chunks),
            pool=disk.pool,
            volume=disk.volume,
        )


def _keep(
    run: GuestRun,
    partial: PartialVersion,
    disk: DiskInfo,
    layers: list[Layer],
    cancel: threading.Event,
) -> DiskRecord:
    names = [layer_file_name(disk.target, i, layer.format) for i, layer in enumerate(layers)]
    digests = []
    tables: list[ChunkTable | None] = []
    for depth, (layer, name) in enumerate(zip(layers, names, strict=True)):
        item = disk.target if depth == 0 else f"{disk.target} backing {depth}"
        result = copy_file(
            layer.path, partial.file_path(name), progress=run.copy_progress(item), cancel=cancel
        )
        run.bytes_copied += result.data_bytes
        digests.append(result.blake3)
        tables.append(result.chunks)
    for depth in range(len(layers) - 1):
        # The copy still names the host's backing path; make it the version's own file.
        dst = partial.file_path(names[depth])
        chains.rebase_unsafe(dst, names[depth + 1], layers[depth + 1].format)
        with naming("flushing", dst):
            fsync_file(dst)
        hashed = hash_with_chunks(dst, cancel=cancel)
        digests[depth], tables[depth] = hashed.blake3, hashed.chunks
    backing = [
        ChainFile(
            file=names[depth],
            source=str(layer.path),
            format=layer.format,
            backing=names[depth + 1] if depth + 1 < len(names) else None,
            blake3=digests[depth],
            chunks=partial.write_chunk_table(names[depth], tables[depth]),
        )
        for depth, layer in enumerate(layers)
        if depth > 0
    ]
    top = partial.file_path(names[0])
    with naming("reading the copy", top):
        return DiskRecord(
            target=disk.target,
            source=disk.source or str(layers[0].path),
            format="qcow2",
            virtual_size=disk_files.virtual_size(top, "qcow2"),
            allocated_size=sum(partial.file_path(n).stat().st_blocks * 512 for n in names),
            file=names[0],
            blake3=digests[0],
            chunks=partial.write_chunk_table(names[0], tables[0]),
            chain=tuple(backing),
            pool=disk.pool,
            volume=disk.volume,
        )


def chain_of(disk: DiskInfo) -> list[Layer] | None:
    """The disk's chain read again now the guest is off (None: a standalone file)."""
    try:
        return chains.disk_chain(disk)
    except chains.ChainError as exc:
        raise CopyError(f"cannot read the backing chain of {disk.target} ({exc})") from exc
