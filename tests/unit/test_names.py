"""Guest names as folder names: reversible, contained, portable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestsafe.engine.archive.names import (
    MAX_DIR_NAME,
    decode_guest_dir,
    encode_guest_name,
    is_truncated,
    matches,
    name_hash,
    printable,
)
from guestsafe.engine.errors import ArchiveError

HOSTILE = [
    "web",
    "db-1.example.com",
    ".",
    "..",
    "...",
    "-rf",
    "--help",
    ".partial-3",
    ".deleting-3",
    "$(touch x)",
    "`id`",
    "a/b",
    "/etc/passwd",
    "../../etc",
    "a\\b",
    "\x1b[31mred\x1b[0m",
    "[b]x[/b]",
    "[red]boom",
    "Grüße",
    "日本語",
    "emoji 😀",
    "\ud800",
    "x\udfffy",
    "\ud83d\ude00",
    "a\x00b",
    "line\nbreak",
    "trailing.",
    "trailing ",
    "%41",
    "a%2Fb",
    "~",
    "a~0123456789abcdef0123456789abcdef",
    "guestsafe-archive.json",
    "GUESTSAFE-ARCHIVE.JSON",
    "guestsafe-lock",
    "CON",
    "x" * 240,
    "x" * 241,
    "x" * 300,
    "é" * 300,
    "😀" * 100,
]

# Every code point, lone surrogates included (libvirt-python can hand us those),
# with the characters the encoding treats specially drawn more often.
ANY_CHAR = st.one_of(
    st.characters(codec=None, categories=None),
    st.characters(categories=["Cs"]),
    st.sampled_from("./-%~_ gG\x00"),
)
ANY_NAME = st.text(ANY_CHAR, min_size=1, max_size=400)

PORTABLE = re.compile(r"[A-Za-z0-9._%~-]+")


def check_shape(encoded: str) -> None:
    assert PORTABLE.fullmatch(encoded), encoded
    assert len(encoded.encode()) <= MAX_DIR_NAME
    assert encoded[0] not in ".-"
    assert not encoded.endswith(".")
    assert not encoded.lower().startswith("guestsafe-")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_round_trip(name: str) -> None:
    encoded = encode_guest_name(name)
    check_shape(encoded)
    assert matches(name, encoded)
    if is_truncated(encoded):
        with pytest.raises(ArchiveError, match="guest-name"):
            decode_guest_dir(encoded)
    else:
        assert decode_guest_dir(encoded) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_folder_stays_inside_root(tmp_path: Path, name: str) -> None:
    folder = tmp_path / encode_guest_name(name)
    assert folder.parent == tmp_path
    assert folder.resolve().parent == tmp_path.resolve()
    folder.mkdir()  # a plain, creatable name
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


@given(ANY_NAME)
@settings(max_examples=500)
def test_any_name_round_trips(name: str) -> None:
    encoded = encode_guest_name(name)
    check_shape(encoded)
    if is_truncated(encoded):
        assert encoded.endswith("~" + name_hash(name))
    else:
        assert decode_guest_dir(encoded) == name


@given(ANY_NAME, ANY_NAME)
def test_different_names_never_share_a_folder(a: str, b: str) -> None:
    if a != b:
        assert encode_guest_name(a) != encode_guest_name(b)


@given(st.text(min_size=0, max_size=300))
def test_decode_accepts_only_what_encode_makes(dirname: str) -> None:
    try:
        name = decode_guest_dir(dirname)
    except ArchiveError:
        return
    assert encode_guest_name(name) == dirname


@pytest.mark.parametrize(
    "dirname",
    [
        "",
        ".hidden",
        ".partial-1",
        "-rf",
        "%2e%2e",  # lower-case hex: a second spelling of ".."
        "%41",  # "A" needs no escape
        "a%2D",  # '-' inside a name needs no escape
        "abc%",
        "abc%4",
        "%zz",
        "%FF",  # not UTF-8
        "a.",
        "guestsafe-archive.json",
        "lost+found",
        "a b",
        "Grüße",
        "backup~old",
    ],
)
def test_decode_refuses_foreign_names(dirname: str) -> None:
    with pytest.raises(ArchiveError):
        decode_guest_dir(dirname)


def test_only_the_first_dot_or_dash_is_escaped() -> None:
    assert encode_guest_name("web") == "web"
    assert encode_guest_name("db-1.example.com") == "db-1.example.com"
    assert encode_guest_name("..") == "%2E%2E"
    assert encode_guest_name("-rf") == "%2Drf"
    assert encode_guest_name("a/b") == "a%2Fb"
    assert encode_guest_name("Grüße") == "Gr%C3%BC%C3%9Fe"


def test_reserved_root_names_are_escaped_case_insensitively() -> None:
    assert encode_guest_name("guestsafe-archive.json") == "%67uestsafe-archive.json"
    assert encode_guest_name("GuestSafe-demo") == "%47uestSafe-demo"
    assert encode_guest_name("guestsafe") == "guestsafe"


def test_empty_name_is_refused() -> None:
    with pytest.raises(ArchiveError, match="empty"):
        encode_guest_name("")
    assert not matches("", "x")


def test_long_names_keep_a_readable_prefix_and_differ_by_hash() -> None:
    base = "vm-" + "a" * 300
    one, two = encode_guest_name(base + "1"), encode_guest_name(base + "2")
    assert one != two
    assert is_truncated(one) and is_truncated(two)
    assert one.startswith("vm-aaaa")
    assert len(one) <= MAX_DIR_NAME
    assert not is_truncated(encode_guest_name("x" * 240))


def test_truncation_cuts_between_characters() -> None:
    encoded = encode_guest_name("é" * 300)
    prefix = encoded.split("~")[0]
    assert decode_guest_dir(prefix) == "é" * (len(prefix) // 6)


def test_printable_quotes_control_characters() -> None:
    assert printable("web") == "web"
    assert printable("\x1b[31m") == "'\\x1b[31m'"
    assert printable("\ud800") == "'\\ud800'"
