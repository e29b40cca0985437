"""The whole-file digest of a file known to equal a previous version's (``KnownFile``).

While every chunk matches the previous table, the whole file is not hashed; an
unchanged file takes the previous digest, and a file that differs anywhere (first
chunk, middle, last, size) is hashed in full after catching up, and comes out as
``b3sum`` would say.
"""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.copier import TABLE_CHUNK, KnownFile, hash_with_chunks

MiB = 1024 * 1024
SIZE = 96 * MiB  # 24 chunks, six of the copier's 16 MiB batches: catch-up spans several


def disk(path: Path) -> None:
    """Data in most chunks, a few holes, small extents between: several batches of spans."""
    rng = random.Random(5)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for index in range(SIZE // TABLE_CHUNK):
            if index % 5 == 3:
                continue  # a hole chunk
            f.seek(index * TABLE_CHUNK + rng.randrange(0, 64) * 4096)
            f.write(rng.randbytes(rng.randrange(64 * 1024, 3 * MiB)))


def known_of(path: Path) -> KnownFile:
    hashed = hash_with_chunks(path)
    assert hashed.chunks is not None and not hashed.reused
    return KnownFile(hashed.chunks, hashed.blake3)


def test_an_unchanged_file_takes_the_known_digest_without_hashing_it(tmp_path: Path) -> None:
    path = tmp_path / "vda.raw"
    disk(path)
    known = known_of(path)
    assert known.blake3 == blake3.blake3(path.read_bytes()).hexdigest()
    # A digest no hashing could give: only reuse returns it.
    marker = KnownFile(known.table, "ab" * 32)
    seen: list[tuple[int, int]] = []
    hashed = hash_with_chunks(
        path, known=marker, progress=lambda done, total: seen.append((done, total))
    )
    assert hashed.reused and hashed.blake3 == "ab" * 32
    assert hashed.chunks == known.table
    assert seen and seen[-1][0] == seen[-1][1] == hashed.data_bytes  # progress still ends at 100 %


@pytest.mark.parametrize(
    "offset", [100, 40 * MiB + 12345, SIZE - 10], ids=["first", "middle", "last"]
)
def test_a_change_anywhere_is_hashed_in_full_as_b3sum_would(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "vda.raw"
    disk(path)
    known = known_of(path)
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"changed")
    hashed = hash_with_chunks(path, known=KnownFile(known.table, "ab" * 32))
    assert not hashed.reused
    assert hashed.blake3 == blake3.blake3(path.read_bytes()).hexdigest()
    assert hashed.chunks == hash_with_chunks(path).chunks


def test_a_hole_that_became_data_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "vda.raw"
    disk(path)
    known = known_of(path)
    with path.open("r+b") as f:
        f.seek(3 * TABLE_CHUNK + 4096)  # chunk 3 was a hole
        f.write(b"x" * 4096)
    hashed = hash_with_chunks(path, known=KnownFile(known.table, "ab" * 32))
    assert not hashed.reused
    assert hashed.blake3 == blake3.blake3(path.read_bytes()).hexdigest()


def test_a_file_of_another_size_is_hashed_in_full(tmp_path: Path) -> None:
    path = tmp_path / "vda.raw"
    disk(path)
    known = known_of(path)
    with path.open("r+b") as f:
        f.truncate(SIZE + TABLE_CHUNK)  # only zeros added: every old chunk still matches
    hashed = hash_with_chunks(path, known=KnownFile(known.table, "ab" * 32))
    assert not hashed.reused
    assert hashed.blake3 == blake3.blake3(path.read_bytes()).hexdigest()
