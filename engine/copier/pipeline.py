"""The copy's pipeline: readers, writers and hashers sharing a pool of buffers.

One copy runs as a small pipeline::

    2 reader threads --batch--> 2 writer threads --bytes written--> caller's thread
                     \\-batch--> 1 hasher thread (in file order)     (progress, cancel)
                     \\-batch--> 1 chunk-table thread (in file order)

A batch is one 16 MiB page-aligned buffer holding one or more data extents
(``extents._plan``). A buffer goes back to the pool once every consumer is done
with it, so memory stays at ``NBUF`` buffers whatever the size of the disk.
The order in which buffers are released and errors raised (``_Pipeline.fail``,
``_Cancelled``, ``files._Shrank``) is what makes the copy correct: it stays here,
in one place, with the mapping of a failed pipeline to its one-line error.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

from guestsafe.engine import failpoints
from guestsafe.engine.copier.extents import CHUNK, _align_up, _Piece, _Plan, _plan
from guestsafe.engine.copier.files import (
    _Dest,
    _resized_error,
    _Shrank,
    _Source,
    _write_error,
)
from guestsafe.engine.copier.hashing import (
    TABLE_CHUNK,
    KnownFile,
    _ChunkHasher,
    _hash_zeros,
    hash_threads,
)
from guestsafe.engine.errors import Cancelled, CopyError

NBUF = 4
READERS = 2
WRITERS = 2
_POLL = 0.1  # seconds between cancel checks while waiting on the pipeline
CATCH_UP_PIECE = 1024 * 1024  # the read-again of ``_Pipeline._catch_up``, O_DIRECT-aligned

ProgressFn = Callable[[int, int], None]


class Pacer(Protocol):
    """How gently a copy runs (``throttle.HostPacer``): its threads' I/O class, its rate."""

    def thread_started(self) -> None:
        """Called first on each of the copy's threads."""

    def wrote(self, nbytes: int, stop: threading.Event) -> None:
        """Called by a writer after each batch; may wait, and returns once ``stop`` is set."""


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class _Batch:
    buf: int
    seq: int  # batches are read out of order; the hasher needs them in order
    spans: tuple[_Piece, ...]  # read and hashed: data, and the small holes between
    segments: tuple[_Piece, ...]  # written: data only, so holes stay holes

    @property
    def nbytes(self) -> int:
        return sum(seg.length for seg in self.segments)


class _Pipeline:
    """Readers, writers (none for hashing alone) and one hasher sharing NBUF buffers.

    Two readers and two writers keep the disk busy while one of them waits for
    a CPU: on a host whose cores run guests, a lone synchronous reader leaves
    the disk idle between requests.
    """

    def __init__(
        self,
        src: _Source,
        dst: _Dest | None,
        cancel: threading.Event | None,
        pace: Pacer | None = None,
        chunk_table: bool = False,
        known: KnownFile | None = None,
    ) -> None:
        self.src = src
        self.pace = pace
        self.dst = dst
        self.cancel = cancel
        # Page-aligned, as O_DIRECT needs; private, so freed as soon as closed.
        self.bufs = [mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE) for _ in range(NBUF)]
        self.views = [memoryview(buf) for buf in self.bufs]
        self.free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for index in range(NBUF):
            self.free.put(index)
        self.to_write: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.to_hash: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        # The chunk table's hashing runs on its own thread, beside the whole-file
        # hasher, over the same buffers: each byte read once, both digests at once
        # on two cores instead of one after the other on one.
        self.to_chunk: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.events: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.refs = [0] * NBUF
        self.lock = threading.Lock()
        self.plan = _plan(src.fd, src.size)
        self.next_seq = 0
        self.readers = READERS
        self.writers = WRITERS if dst is not None else 0
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.error_side = ""
        threads = hash_threads(shared=chunk_table)
        self.hasher = blake3.blake3(max_threads=threads)
        # Fed the same bytes as ``hasher``: the chunk table costs no extra read.
        self.chunker = _ChunkHasher(src.size, threads=threads) if chunk_table else None
        self.done = 0
        self._init_known(known)

    def _init_known(self, known: KnownFile | None) -> None:
        """Hash the whole file only once a chunk differs from ``known``'s (``KnownFile``).

        Until then the whole-file hasher only counts the batches it passes over;
        the first differing chunk makes it read those again and catch up.
        """
        if self.chunker is None:
            known = None  # nothing to compare with: the whole file is hashed as it comes
        self.known = known
        self.diverged = threading.Event()  # a chunk differs: the whole file must be hashed
        if known is not None and not known.same_shape(self.src.size, TABLE_CHUNK):
            self.diverged.set()
        self.checked = threading.Event()  # every chunk was compared
        self.compared = 0  # chunk entries compared with ``known``'s so far
        self.skipped = 0  # batches the whole-file hasher passed over unhashed
        self.reused = False  # the digest is ``known.blake3``: no chunk differed

    @property
    def digest(self) -> str:
        """The whole-file BLAKE3 (hex), once ``run`` has returned without error."""
        if self.reused:
            assert self.known is not None
            return self.known.blake3
        return str(self.hasher.hexdigest())

    # -- coordination

    def fail(self, side: str, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error, self.error_side = exc, side
        self.abort.set()
        # Wake every thread blocked on a queue so it can see the abort.
        for _ in range(self.readers):
            self.free.put(None)
        for _ in range(self.writers):
            self.to_write.put(None)
        self.to_hash.put(None)
        self.to_chunk.put(None)

    def _release(self, index: int) -> None:
        with self.lock:
            self.refs[index] -= 1
            last = self.refs[index] == 0
        if last:
            self.free.put(index)

    def _thread(self, side: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                if self.pace is not None:
                    self.pace.thread_started()
                body()
            except BaseException as exc:
                self.fail(side, exc)
            finally:
                self.events.put(None)

        return threading.Thread(target=run, name=f"guestsafe-copy-{side}", daemon=True)

    def run(self, total: int, progress: ProgressFn | None) -> None:
        """Run all stages; return when every thread has exited."""
        threads = [self._thread("hash", self._hash_loop)]
        if self.chunker is not None:
            threads.append(self._thread("chunks", self._chunk_loop))
        threads += [self._thread("read", self._read_loop) for _ in range(self.readers)]
        threads += [self._thread("write", self._write_loop) for _ in range(self.writers)]
        for thread in threads:
            thread.start()
        try:
            self._supervise(len(threads), total, progress)
        except BaseException as exc:
            self.fail("caller", exc)
            raise
        finally:
            for thread in threads:
                thread.join()
            for view in self.views:
                view.release()
            for buf in self.bufs:
                with contextlib.suppress(BufferError):  # a slice still alive: GC frees it
                    buf.close()

    def _supervise(self, running: int, total: int, progress: ProgressFn | None) -> None:
        while running:
            if self.cancel is not None and self.cancel.is_set() and not self.abort.is_set():
                self.fail("cancel", _Cancelled())
            try:
                event = self.events.get(timeout=_POLL)
            except queue.Empty:
                continue
            if event is None:
                running -= 1
                continue
            self.done += event
            if progress is not None and not self.abort.is_set():
                progress(self.done, total)
        if self.error is None and progress is not None and total == 0:
            progress(0, 0)

    # -- stages

    def _next_batch(self) -> tuple[int, int, _Plan] | None:
        """A free buffer and the next batch to read into it; None when done or aborted."""
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled
        index = self.free.get()
        if index is None or self.abort.is_set():
            return None
        with self.lock:  # a generator must not run in two threads at once
            plan = next(self.plan, None)
            seq = self.next_seq
            self.next_seq += 1
        if plan is None:
            self.free.put(index)  # for the other reader, which then sees the end too
            return None
        return index, seq, plan

    def _read_loop(self) -> None:
        while (job := self._next_batch()) is not None:
            index, seq, (spans, segments) = job
            view = self.views[index]
            for span in spans:
                room = view[span.start : span.start + _align_up(span.length)]
                self.src.read_into(room, span.offset, span.length)
            self.refs[index] = 1 + (self.writers > 0) + (self.chunker is not None)
            batch = _Batch(index, seq, spans, segments)
            self.to_hash.put(batch)
            if self.chunker is not None:
                self.to_chunk.put(batch)
            if self.writers:
                self.to_write.put(batch)
        self._reader_finished()

    def _reader_finished(self) -> None:
        with self.lock:
            self.readers -= 1
            last = self.readers == 0
        if last and not self.abort.is_set():
            self.to_hash.put(None)
            self.to_chunk.put(None)
            for _ in range(self.writers):
                self.to_write.put(None)

    def _write_loop(self) -> None:
        assert self.dst is not None
        while (batch := self.to_write.get()) is not None and not self.abort.is_set():
            self.dst.write_batch(self.views[batch.buf], batch.segments)
            failpoints.hit("copy.chunk")
            self._release(batch.buf)
            self.events.put(batch.nbytes)
            if self.pace is not None:  # after the buffer is back: the readers go on meanwhile
                self.pace.wrote(batch.nbytes, self.abort)

    def _in_order(self, batches: queue.SimpleQueue[_Batch | None]) -> Iterator[_Batch]:
        """The batches of ``batches`` in file order, whichever reader read them first."""
        turn = 0  # seq of the next batch to hand out
        early: dict[int, _Batch] = {}  # batches read ahead of their turn
        while (batch := batches.get()) is not None and not self.abort.is_set():
            early[batch.seq] = batch
            while turn in early:
                yield early.pop(turn)
                turn += 1

    def _hash_loop(self) -> None:
        pos = 0  # bytes of the file hashed so far
        for batch in self._in_order(self.to_hash):
            if self.known is not None and not self.diverged.is_set():
                self.skipped += 1
            else:
                pos = self._catch_up(pos)
                pos = self._hash_spans(self.views[batch.buf], batch.spans, pos)
            self._release(batch.buf)
            if not self.writers:
                self.events.put(batch.nbytes)
                if self.pace is not None:  # a read-only pass of a backup (shared_copy)
                    self.pace.wrote(batch.nbytes, self.abort)
        if self.abort.is_set() or self._settled_by_known():
            return
        pos = self._catch_up(pos)
        _hash_zeros(self.hasher, self.src.size - pos)

    def _hash_spans(self, view: memoryview, spans: tuple[_Piece, ...], pos: int) -> int:
        """One batch into the whole-file hasher, zeros for the holes before each span."""
        for span in spans:
            _hash_zeros(self.hasher, span.offset - pos)
            self.hasher.update(view[span.start : span.start + span.length])
            pos = span.offset + span.length
        return pos

    def _settled_by_known(self) -> bool:
        """True when nothing is left to hash: every chunk matched ``known``'s table
        (``reused`` set), or the pipeline failed while the comparison ran."""
        if self.known is None:
            return False
        while not self.checked.wait(_POLL):
            if self.abort.is_set():
                return True  # nothing more to hash: the copy has failed
        self.reused = not self.diverged.is_set()
        return self.reused

    def _catch_up(self, pos: int) -> int:
        """Hash the batches passed over while the file matched, reading them again.

        The plan is walked afresh over the same extents, so its first ``skipped``
        batches are the ones passed over. A small buffer of its own, read a piece
        at a time: the pool's stay with the readers (which wait meanwhile, as for a
        slow hasher), and the copy's memory grows by ``CATCH_UP_PIECE`` only.
        """
        if not self.skipped:
            return pos
        buf = mmap.mmap(-1, CATCH_UP_PIECE, flags=mmap.MAP_PRIVATE)
        view = memoryview(buf)
        try:
            plan = _plan(self.src.fd, self.src.size)
            for _ in range(self.skipped):
                spans, _segments = next(plan)
                for span in spans:
                    _hash_zeros(self.hasher, span.offset - pos)
                    self._hash_read_again(view, span.offset, span.length)
                    pos = span.offset + span.length
            self.skipped = 0
            return pos
        finally:
            view.release()
            buf.close()

    def _hash_read_again(self, view: memoryview, offset: int, length: int) -> None:
        for start in range(offset, offset + length, CATCH_UP_PIECE):
            if self.abort.is_set():
                raise _Cancelled
            count = min(CATCH_UP_PIECE, offset + length - start)
            with view[: _align_up(count)] as room:
                self.src.read_into(room, start, count)
            with view[:count] as piece:
                self.hasher.update(piece)

    def _chunk_loop(self) -> None:
        """The chunk table, from the same buffers as ``_hash_loop``, at the same time."""
        chunker = self.chunker
        assert chunker is not None
        pos = 0
        for batch in self._in_order(self.to_chunk):
            view = self.views[batch.buf]
            for span in batch.spans:
                chunker.zeros(span.offset - pos)
                chunker.data(view[span.start : span.start + span.length])
                pos = span.offset + span.length
            self._release(batch.buf)
            self._compare_chunks()
        if not self.abort.is_set():
            chunker.zeros(self.src.size - pos)
            self._compare_chunks()
            self.checked.set()

    def _compare_chunks(self) -> None:
        """Compare the chunks closed since the last call with ``known``'s; note a difference."""
        if self.known is None or self.diverged.is_set():
            return
        assert self.chunker is not None
        entries, start = self.chunker.entries, self.compared * 32
        if entries[start:] != self.known.table.entries[start : len(entries)]:
            self.diverged.set()
        self.compared = len(entries) // 32


def _copy_error(pipe: _Pipeline, src: Path, dst: Path, total: int) -> CopyError:
    exc, side = pipe.error, pipe.error_side
    if isinstance(exc, _Cancelled):
        return Cancelled("copy cancelled")
    # A shrunk device ends a read early, or fails it (EIO with O_DIRECT): name the cause.
    resized = pipe.src.changed_size() if side == "read" else None
    if resized is not None:
        return _resized_error(src, pipe.src.size, resized)
    if isinstance(exc, _Shrank):
        return CopyError(f"{src} shrank while being copied; is something still writing it?")
    if isinstance(exc, OSError):
        if side == "read":
            return CopyError(f"cannot read {src}: {exc.strerror}")
        return _write_error(exc, dst, total - pipe.done, total)
    return CopyError(f"copying {src} to {dst} failed: {exc}")
