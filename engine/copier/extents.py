"""The extent walk: a file's data extents (SEEK_DATA/SEEK_HOLE), and how they fill buffers.

``data_ranges`` gives the exact extents of a range (the chunk verifier and the
shared copy read with it). The copy widens them to ``ALIGN`` so O_DIRECT can read
them, merges extents a few KiB apart into one span read with its hole as zeros,
and packs them into ``CHUNK``-sized batches (``_plan``): the spans to read and
hash, and the segments to write, so holes stay holes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

MiB = 1024 * 1024
CHUNK = 16 * MiB  # one buffer of the copy's pipeline
# O_DIRECT needs offsets and lengths aligned to the device's logical block;
# 4096 satisfies both 512-byte and 4Kn devices.
ALIGN = 4096
# Extents closer than this are read as one span, hole included: an O_DIRECT
# read of a small hole (zeros, no disk I/O) costs less than one more request.
MERGE_GAP = 128 * 1024


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data extents of ``[start, end)`` of ``fd``, clipped to it (SEEK_DATA/SEEK_HOLE)."""
    pos = start
    while pos < end:
        try:
            low = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end  # no SEEK_DATA here: all of it is data
                return
            raise
        if low >= end:
            return
        high = min(os.lseek(fd, low, os.SEEK_HOLE), end)
        yield low, high
        pos = high


def _raw_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                yield 0, size  # no SEEK_DATA here: all of it is data
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Data extents as (start, end), widened to ALIGN (capped at EOF) and merged.

    Widening lets O_DIRECT read them; the extra bytes are hole, so read as zeros.
    A generator, not a list, so a badly fragmented file costs no memory.
    """
    cur: tuple[int, int] | None = None
    for raw_start, raw_end in _raw_extents(fd, size):
        start = raw_start // ALIGN * ALIGN
        end = min(_align_up(raw_end), size)
        if cur is not None and start <= cur[1]:
            cur = (cur[0], max(cur[1], end))
            continue
        if cur is not None:
            yield cur
        cur = (start, end)
    if cur is not None:
        yield cur


def _data_bytes(fd: int, size: int) -> int:
    return sum(end - start for start, end in _extents(fd, size))


@dataclass(frozen=True)
class _Piece:
    offset: int  # in the file
    start: int  # in the buffer, ALIGN-aligned
    length: int


_Plan = tuple[tuple[_Piece, ...], tuple[_Piece, ...]]


def _plan(fd: int, size: int) -> Iterator[_Plan]:
    """Pack data extents into buffer-sized batches of (spans, segments)."""
    spans: list[_Piece] = []
    segments: list[_Piece] = []
    for start, end in _extents(fd, size):
        while start < end:
            pos, joins = _place(spans, start)
            if pos >= CHUNK:
                yield tuple(spans), tuple(segments)
                spans, segments = [], []
                continue
            length = min(end - start, CHUNK - pos)
            segments.append(_Piece(start, pos, length))
            if joins:
                last = spans[-1]
                spans[-1] = _Piece(last.offset, last.start, start + length - last.offset)
            else:
                spans.append(_Piece(start, pos, length))
            start += length
    if spans:
        yield tuple(spans), tuple(segments)


def _place(spans: list[_Piece], offset: int) -> tuple[int, bool]:
    """Where data at ``offset`` goes in the buffer, and whether it extends the last span."""
    if not spans:
        return 0, False
    last = spans[-1]
    if offset - (last.offset + last.length) <= MERGE_GAP:
        return last.start + offset - last.offset, True
    return last.start + _align_up(last.length), False
