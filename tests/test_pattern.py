"""The pattern language: every grammar feature, every error with its position, and a property test."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amer import Family, Pattern, PatternError, parse_pattern
from amer.pattern import MAX_LAYERS, load_preset, preset_names


def letters(p: Pattern) -> str:
    return "".join(layer.family.value for layer in p.layers)


def test_letters_indices_and_family_indices() -> None:
    p = parse_pattern("AEMEAR")
    assert letters(p) == "AEMEAR"
    assert [layer.index for layer in p] == list(range(6))
    assert [layer.family_index for layer in p] == [0, 0, 0, 1, 1, 0]
    assert [layer.name for layer in p] == ["A0", "E0", "M0", "E1", "A1", "R0"]
    assert p[2].family == Family("M") and p[2].family.spec.name == "mamba" and p.count("E") == 2 and p.n_stages == 1


def test_groups_nested_and_whitespace() -> None:
    assert letters(parse_pattern("(AEME)*3")) == "AEME" * 3
    assert letters(parse_pattern(" (A (EM)*2 )*2 R ")) == "AEMEM" * 2 + "R"
    assert letters(parse_pattern("A\tE\nM")) == "AEM"


def test_depth_tiling_nam56r_shape() -> None:
    p = parse_pattern("AEMEAEMEAEMR@52")
    assert len(p) == 52
    assert letters(p) == ("AEMEAEMEAEMR" * 5)[:52]
    assert (p.count("A"), p.count("E"), p.count("M"), p.count("R")) == (13, 22, 13, 4)
    assert letters(parse_pattern("AE@3")) == "AEA"
    assert letters(parse_pattern("(AE)*2@3")) == "AEA"


def test_stages() -> None:
    p = parse_pattern("AEME|AEME|MR")
    assert p.n_stages == 3
    assert [layer.stage for layer in p] == [0] * 4 + [1] * 4 + [2] * 2
    assert p.letters == "AEME|AEME|MR"
    assert [layer.index for layer in p.stage_layers(1)] == [4, 5, 6, 7]
    # bars inside a repeated group repeat the boundary
    q = parse_pattern("(AE|)*2M")
    assert q.letters == "AE|AE|M"


def test_presets_resolve() -> None:
    assert {"tiny", "small", "nam56r"} <= set(preset_names())
    p = parse_pattern("nam56r")
    assert len(p) == 52 and p.preset == "nam56r"
    for name in ("tiny", "small", "nam56r"):
        data = load_preset(name)
        # every preset states its STP selection explicitly
        assert data["stp"]["layers"], name
        assert "enabled" in data["stp"], name


@pytest.mark.parametrize(
    "text, pos, fragment",
    [
        ("AEMX", 3, "unknown block 'X' at position 3; expected A (attention), M (mamba), E (expert), R (recurrent)"),
        ("", 0, "empty"),
        ("   ", 0, "empty"),
        ("(AE", 0, "unbalanced '('"),
        ("AE)", 2, "unbalanced ')'"),
        ("A(E(M)*2", 1, "unbalanced '('"),
        ("(AE)*0", 4, "'*0' must be at least 1"),
        ("aem", 0, "did you mean 'A'"),
        ("AEm", 2, "did you mean 'M'"),
        ("AE|MR@8", 5, "conflicts with the '|' stage boundary at position 2"),
        ("(AE)", 4, "repeat count"),
        ("(AE)*", 4, "repeat count"),
        ("A*3", 1, "'*' without a group"),
        ("()*2", 0, "empty group"),
        ("AE@0", 2, "at least 1"),
        ("AE@", 2, "layer count"),
        ("AE@4@5", 4, "second '@'"),
        ("AE@4M", 4, "'@DEPTH' must come last"),
        ("|AE", 0, "empty pipeline stage"),
        ("A||E", 2, "empty pipeline stage"),
        ("AE|", 2, "empty pipeline stage"),
        ("(A@3)*2", 2, "inside a group"),
    ],
)
def test_errors_name_position(text: str, pos: int, fragment: str) -> None:
    with pytest.raises(PatternError) as exc:
        parse_pattern(text)
    assert fragment in str(exc.value)
    assert exc.value.position == pos
    assert isinstance(exc.value, ValueError)
    assert "\n" not in str(exc.value)


def test_exact_message_for_unknown_block() -> None:
    with pytest.raises(PatternError,
                       match=r"^pattern 'AEMX': unknown block 'X' at position 3; expected A \(attention\), "
                       r"M \(mamba\), E \(expert\), R \(recurrent\), G \(deltanet\), S \(mamba1\), C \(shortconv\), "
                       r"D \(mla\), N \(lightning\), H \(zamba\)$"):
        parse_pattern("AEMX")


def test_unknown_preset_suggests_closest() -> None:
    with pytest.raises(PatternError, match="no preset named 'tinyy'.*did you mean 'tiny'"):
        parse_pattern("tinyy")


def test_huge_counts_fail_fast() -> None:
    with pytest.raises(PatternError, match="layers"):
        parse_pattern("(AEME)*999999999")
    with pytest.raises(PatternError, match="limit"):
        parse_pattern(f"A@{MAX_LAYERS + 1}")
    with pytest.raises(PatternError, match="layers"):
        parse_pattern("((AE)*1000)*1000")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="AEMRaemrX()*|@0123456789 \t-", max_size=24) | st.text(max_size=16))
def test_property_only_pattern_or_pattern_error(text: str) -> None:
    try:
        p = parse_pattern(text)
    except PatternError as e:
        assert str(e).startswith(("pattern ", "no preset", "preset ")), str(e)
        return
    assert isinstance(p, Pattern)
    assert 1 <= len(p) <= MAX_LAYERS
    assert [layer.index for layer in p] == list(range(len(p)))
    for fam in Family.all():
        assert [layer.family_index for layer in p.of_family(fam)] == list(range(p.count(fam)))


@pytest.mark.parametrize("text, pos, fragment", [
    ("A((|)*99999)*99999", 2, "stage boundaries"),  # counted before expanding: no 80 GB list
    ("A(|)*100000000", 1, "stage boundaries"),
    ("(" * 1200 + "A" + ")*1" * 1200, 64, "nested more than 64 deep"),  # no RecursionError
    ("(A)*²", 4, "digits 0-9"),  # str.isdigit() accepts it, int() does not
    ("AE@٣", 3, "digits 0-9"),
    ("(A)*" + "9" * 5000, 4, "5000 digits"),
])
def test_bombs_and_foreign_digits_are_pattern_errors_with_a_position(text: str, pos: int, fragment: str) -> None:
    t0 = time.process_time()
    with pytest.raises(PatternError) as exc:
        parse_pattern(text)
    assert time.process_time() - t0 < 1.0
    assert exc.value.position == pos and fragment in str(exc.value) and len(str(exc.value)) < 400


def test_bars_inside_groups_count_towards_stages() -> None:
    assert parse_pattern("(A|E)*3").letters == "A|EA|EA|E"
    assert parse_pattern("(A|)*3E").n_stages == 4
