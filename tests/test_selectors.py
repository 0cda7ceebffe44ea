"""The tap selector language, resolved against a pattern (no model needed)."""

from __future__ import annotations

import pytest

from amer import SelectorError, parse_pattern
from amer.tap import resolve_selector, tap_names

P = parse_pattern("AEMEAEMR")  # layers: A0 E0 M0 E1 A1 E2 M1 R0


def names(sel: str) -> list[str]:
    all_names = tap_names(P)
    return [all_names[i] for i in resolve_selector(sel, P)]


def test_tap_names_depth_order() -> None:
    assert tap_names(P) == ["embed", "A0", "E0", "M0", "E1", "A1", "E2", "M1", "R0", "final"]


@pytest.mark.parametrize(
    "sel, expected",
    [
        ("A", ["A0", "A1"]),
        ("A0", ["A0"]),
        ("A-1", ["A1"]),
        ("E1:3", ["E1", "E2"]),
        ("E:2", ["E0", "E1"]),
        ("E-2:", ["E1", "E2"]),
        ("L7", ["R0"]),
        ("L-1", ["R0"]),
        ("L2:5", ["M0", "E1", "A1"]),
        ("final", ["final"]),
        ("embed", ["embed"]),
        ("A-1,M-1,E-1,R-1", ["A1", "E2", "M1", "R0"]),
        (" R-1 , A0 ", ["A0", "R0"]),  # order-insensitive, whitespace ignored
        ("final,M", ["M0", "M1", "final"]),
    ],
)
def test_selects(sel: str, expected: list[str]) -> None:
    assert names(sel) == expected


@pytest.mark.parametrize(
    "sel, fragment",
    [
        ("A5", "selector 'A5' selects nothing: the pattern has attention blocks A0..A1"),
        ("A-3", "selects nothing"),
        ("L8", "the pattern has layers L0..L7"),
        ("E3:9", "selects nothing"),
        ("", "empty tap selector"),
        ("A0,,M0", "empty item"),
        ("A-1,A1", "selects tap A1 twice"),
        ("A,A0", "twice"),
        ("X3", "unknown item 'X3'"),
        ("a-1", "did you mean 'A-1'"),
        ("final2", "unknown item"),
    ],
)
def test_errors(sel: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as exc:
        resolve_selector(sel, P)
    assert fragment in str(exc.value)


def test_family_absent_is_clear_error() -> None:
    with pytest.raises(SelectorError,
                       match=r"selector 'M-1' selects nothing: the pattern 'AEAE' has no mamba \(M\) blocks"):
        resolve_selector("M-1", parse_pattern("AEAE"))


@pytest.mark.parametrize("sel, pos, fragment", [
    ("A0, Q1", 4, "unknown item 'Q1' at position 4"),
    ("A-1,,M0", 4, "empty item at position 4"),
    ("A:-", 0, "unknown item 'A:-'"),
    ("L3:-", 0, "unknown item 'L3:-'"),
    ("A" + "9" * 5000, 0, "selects nothing"),  # no int() of 5000 digits
    ("M0,A٣", 3, "unknown item"),  # \d would have read it as 3
    ("Final", 0, "did you mean 'final'"),  # names are lower case: rejected, not guessed
    ("emb", 0, "did you mean 'embed'"),
    ("embedding", 0, "did you mean 'embed'"),
    ("R:", 0, "slice without bounds"),
    ("A0,A-2", 3, "twice"),
])
def test_errors_name_the_position(sel: str, pos: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as exc:
        resolve_selector(sel, P)
    assert exc.value.position == pos and fragment in str(exc.value) and "\n" not in str(exc.value)


def test_documented_forms() -> None:
    assert names("L") == tap_names(P)[1:-1]  # L alone: every block, like A for every attention block
    assert names("E1:") == ["E1", "E2"] and names("E:-1") == ["E0", "E1"]
