"""Guest names as directory names: reversible, safe for any name libvirt accepts.

The rules are part of archive format v1 and are specified in FORMAT.md ("Guest
directory names"). In short: the name's UTF-8 bytes (lone surrogates kept with
``surrogatepass``) are percent-encoded, except ``A-Z a-z 0-9 _`` and, inside
the name, ``.`` and ``-``. Hex digits are upper case and every name has exactly
one encoding, so decoding can check itself by encoding again.

An encoding longer than ``MAX_DIR_NAME`` is cut at a character boundary and given
``~`` plus a hash of the full name. Such a directory cannot be decoded from its
name alone: the archive keeps the name in a ``guest-name`` file inside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import blake3

from guestsafe.engine.errors import AmbiguousGuest, ArchiveError

# Bytes, not characters; the result is ASCII. 255 is NAME_MAX on every Linux
# filesystem; the margin leaves room for temporary names made from this one.
MAX_DIR_NAME = 240

# '~' never appears in a full encoding (it is escaped), so it marks a truncated one.
TRUNCATION_MARK = "~"
_HASH_HEX = 32  # 128 bits of BLAKE3: collisions are out of reach
_PREFIX_BUDGET = MAX_DIR_NAME - len(TRUNCATION_MARK) - _HASH_HEX

_ALWAYS_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_INNER_SAFE = frozenset(b".-")
_HEX = "0123456789ABCDEF"
_TRUNCATED = re.compile(
    rf"[A-Za-z0-9_%][A-Za-z0-9_.%-]{{0,{_PREFIX_BUDGET - 1}}}~[0-9a-f]{{{_HASH_HEX}}}"
)

# Root-level names the format keeps for itself ("guestsafe-archive.json" and any
# later addition). Compared case-insensitively: exFAT and NTFS fold case.
_RESERVED_PREFIX = "guestsafe-"


def _raw(name: str) -> bytes:
    # surrogatepass keeps lone surrogates, which Python can hold in a str, reversible.
    return name.encode("utf-8", "surrogatepass")


def _escape(byte: int) -> str:
    return "%" + _HEX[byte >> 4] + _HEX[byte & 0xF]


def _encode_char(char: str, *, first: bool, last: bool) -> str:
    out = []
    for byte in _raw(char):
        # A leading '.' or '-' would hide the folder or look like an option; a
        # trailing '.' is dropped by Windows-style filesystems (NTFS, exFAT).
        inner_ok = byte in _INNER_SAFE and not first and not (last and byte == ord("."))
        out.append(chr(byte) if byte in _ALWAYS_SAFE or inner_ok else _escape(byte))
    return "".join(out)


def _pieces(name: str) -> list[str]:
    last = len(name) - 1
    pieces = [_encode_char(c, first=i == 0, last=i == last) for i, c in enumerate(name)]
    if "".join(pieces[:10]).lower().startswith(_RESERVED_PREFIX):
        pieces[0] = _escape(ord(pieces[0]))
    return pieces


def name_hash(name: str) -> str:
    """The hash suffix of a truncated encoding (first 128 bits of BLAKE3, hex)."""
    return str(blake3.blake3(_raw(name)).hexdigest())[:_HASH_HEX]


def encode_guest_name(name: str) -> str:
    """The directory name of guest ``name``: only ``A-Za-z0-9._-%~``, at most 240 bytes.

    Never empty, never starts with ``.`` or ``-``, never equals a name the archive
    format reserves, and different names never share a directory name.
    """
    if not name:
        raise ArchiveError("a guest name cannot be empty")
    pieces = _pieces(name)
    encoded = "".join(pieces)
    if len(encoded) <= MAX_DIR_NAME:
        return encoded
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > _PREFIX_BUDGET:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + TRUNCATION_MARK + name_hash(name)


def is_truncated(dirname: str) -> bool:
    """True if ``dirname`` has the shape of a truncated encoding (prefix ``~`` hash).

    Its guest name cannot be read from it; the archive keeps it in ``guest-name``.
    """
    return _TRUNCATED.fullmatch(dirname) is not None


def matches(name: str, dirname: str) -> bool:
    """True if ``dirname`` is the directory of guest ``name`` (works when truncated)."""
    try:
        return bool(name) and encode_guest_name(name) == dirname
    except ArchiveError:
        return False


def decode_guest_dir(dirname: str) -> str:
    """The guest name a full (not truncated) directory name encodes.

    Raises ArchiveError for anything ``encode_guest_name`` would not have made,
    including truncated names (see ``is_truncated``); an archive reader skips those
    folders as foreign.
    """
    if is_truncated(dirname):
        raise ArchiveError(
            f"guest folder {dirname!r} has a shortened name; its full name is in its "
            "guest-name file"
        )
    name = _percent_decode(dirname)
    if name is None or not matches(name, dirname):
        raise ArchiveError(f"{dirname!r} is not a guestsafe guest folder name")
    return name


def _percent_decode(dirname: str) -> str | None:
    if not dirname.isascii():
        return None
    out = bytearray()
    i = 0
    while i < len(dirname):
        char = dirname[i]
        if char != "%":
            out.append(ord(char))
            i += 1
            continue
        digits = dirname[i + 1 : i + 3]
        if len(digits) != 2 or any(d not in _HEX for d in digits):
            return None
        out.append(int(digits, 16))
        i += 3
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


# C0 controls but tab: XML 1.0 cannot carry them, so libvirt never has them in a name;
# nor a lone surrogate, which UTF-8 (XML, TOML) cannot store.
_UNNAMEABLE = re.compile("[\x00-\x08\x0a-\x1f\ud800-\udfff]")


def libvirt_accepts(name: str) -> bool:
    """True if a libvirt guest can have this name: not blank, no '/', no control
    character but tab. Anything else (RTL override, zero-width space, "$(x)") can."""
    return bool(name.strip()) and "/" not in name and _UNNAMEABLE.search(name) is None


def printable(name: str) -> str:
    """``name`` as it may appear in a message: quoted and escaped if it holds
    control characters, escapes or lone surrogates."""
    return name if name.isprintable() else repr(name)


# --- series: which host's guest a folder holds --------------------------------

# The host this machine is, whose guests keep the folders they had before hosts
# existed (their series is the bare guest name). Equal to hypervisor.hosts.LOCAL_HOST;
# the archive sits below the hypervisor layer and cannot import it.
LOCAL_SERIES_HOST = "local"
# libvirt refuses '/' in a guest name, so "node2/web1" names no local guest: the
# series of web1 on host node2, whose folder is "node2%2Fweb1" (section 4 of FORMAT.md).
HOST_SEPARATOR = "/"


def series_name(guest: str, host: str | None = None) -> str:
    """The archive's name for ``guest`` of ``host``: the guest's own on this machine."""
    if host is None or host == LOCAL_SERIES_HOST:
        return guest
    if not host or HOST_SEPARATOR in host:
        raise ArchiveError(f"host name {host!r} cannot qualify a guest folder")
    return f"{host}{HOST_SEPARATOR}{guest}"


def split_series(series: str) -> tuple[str, str]:
    """``(host, guest)`` of an archive name: ``("local", "web1")``, ``("node2", "web1")``."""
    host, separator, guest = series.partition(HOST_SEPARATOR)
    if not separator:
        return LOCAL_SERIES_HOST, series
    return host, guest


def pick_series(known: Iterable[str], guest: str, host: str | None = None) -> str:
    """The series a command means by ``guest`` (and ``--host``), among ``known`` ones.

    With ``host`` it is that host's. Without, a guest backed up from one host alone
    is that host's; one backed up from several is refused with ``AmbiguousGuest``,
    asking for ``--host``; one not backed up at all is this machine's.
    """
    if host is not None:
        return series_name(guest, host)
    found = [s for s in dict.fromkeys(known) if split_series(s)[1] == guest]
    if len(found) > 1:
        hosts = ", ".join(sorted(split_series(s)[0] for s in found))
        raise AmbiguousGuest(
            f"guest {printable(guest)} is backed up from several hosts ({hosts}); "
            "name one with --host"
        )
    return found[0] if found else guest
