"""Fuzzing the two little languages a user types: patterns and tap selectors.

Whatever the string, the parser either returns a well-formed result or raises its own error (a
``PatternError`` / ``SelectorError`` naming a position inside the string, on one line), quickly: no other
exception, no recursion limit, no memory bomb. Structured strings are also checked against an independent
expansion, so a fast wrong answer fails too. 10,000 arbitrary strings of each language, 2,000 structured ones
checked against the reference (the slow set, still run in CI).
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amer.errors import PatternError, SelectorError
from amer.pattern import MAX_LAYERS, parse_pattern
from amer.tap import resolve_selector, tap_names

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CHECK = settings(FUZZ, max_examples=2_000)  # the reference checks: fewer, larger examples
SLOW_CALL_S = 2.0  # CPU seconds for one parse: a bomb that expands before counting takes far longer

PATTERN_CHARS = "AEMRaemrXL()*|@0123456789 \t²٣-"


def structured(counts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Well-bracketed patterns: letters, stage bars and groups with a count, nested a few deep."""
    def group(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.tuples(st.lists(inner, min_size=1, max_size=4), counts).map(lambda t: f"({''.join(t[0])})*{t[1]}")

    tree = st.recursive(st.sampled_from("AEMR|"), lambda inner: inner | group(inner), max_leaves=8)
    return st.lists(tree, min_size=1, max_size=4).map("".join)


valid_counts = st.one_of(st.integers(1, 4), st.integers(1, 10**9)).map(str)
valid_structured = structured(valid_counts)


def random_structured(seed: int) -> str:
    """A bracketed pattern built from one drawn seed: cheap to draw, so 10,000 of them stay fast. Counts are
    small, huge, zero, missing or foreign digits; groups nest up to five deep."""
    rng = random.Random(seed)

    def items(depth: int) -> str:
        out = ""
        for _ in range(rng.randint(1, 4)):
            if depth < 5 and rng.random() < 0.35:
                count = rng.choice(["1", "2", "3", str(rng.randint(0, 10**12)), "", "0", "²", "٣", "9" * 30])
                out += f"({items(depth + 1)})*{count}"
            else:
                out += rng.choice("AEMR|")
        return out

    return items(0) + (f"@{rng.randint(0, 6000)}" if rng.random() < 0.1 else "")


def nested(n: int) -> str:
    return "(" * n + "A" + ")*1" * n


def check_pattern(text: str) -> None:
    t0 = time.process_time()
    try:
        p = parse_pattern(text)
    except PatternError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(("pattern ", "no preset", "preset ")), msg
        assert e.position is None or 0 <= e.position <= len(text), (e.position, text)  # len: "found the end"
    else:
        assert 1 <= len(p) <= MAX_LAYERS
        assert [layer.index for layer in p] == list(range(len(p)))
        assert p.letters.count("|") == p.n_stages - 1
    assert time.process_time() - t0 < SLOW_CALL_S, f"{text[:80]!r} took {time.process_time() - t0:.2f}s"


def reference(text: str) -> str | None:
    """The letters a structured pattern expands to, by string rewriting (None: past the layer limit)."""
    while "(" in text:
        close = text.index(")")
        open_ = text.rindex("(", 0, close)
        j = close + 2
        while j < len(text) and text[j].isascii() and text[j].isdigit():
            j += 1
        inner, n = text[open_ + 1:close], int(text[close + 2:j])
        if len(inner.replace("|", "")) * n > MAX_LAYERS or inner.count("|") * n > MAX_LAYERS:
            return None
        text = text[:open_] + inner * n + text[j:]
    return text


@pytest.mark.slow
@FUZZ
@given(st.text(alphabet=PATTERN_CHARS, max_size=30) | st.text(max_size=20)
       | st.integers(0, 2**32).map(random_structured) | st.integers(60, 1500).map(nested))
def test_any_string_is_a_pattern_or_a_pattern_error(text: str) -> None:
    check_pattern(text)


@pytest.mark.slow
@CHECK
@given(valid_structured)
def test_structured_patterns_expand_like_the_reference(text: str) -> None:
    expected = reference(text)
    valid = (expected is not None and 0 < len(expected.replace("|", "")) <= MAX_LAYERS and "||" not in expected
             and not expected.startswith("|") and not expected.endswith("|"))
    try:
        got = parse_pattern(text).letters
    except PatternError:
        assert not valid, f"{text!r} expands to {expected!r} but was refused"
        return
    assert valid and got == expected, text


SELECTOR_PATTERN = parse_pattern("AEMEAEMR")  # A0 E0 M0 E1 A1 E2 M1 R0
SELECTOR_CHARS = "AEMRLXaf inalembd0123456789-:,²٣ "
names = tap_names(SELECTOR_PATTERN)


_num = st.one_of(st.integers(-12, 12), st.integers(-10**30, 10**30)).map(str)
_bound = _num | st.just("")
_kinds = st.sampled_from("AEMRLX")
# one item: a family or L, bare, with an index, or with a slice (either bound may be missing)
selector_items = st.one_of(_kinds, st.tuples(_kinds, _num).map("".join),
                           st.tuples(_kinds, _bound, _bound).map(lambda t: f"{t[0]}{t[1]}:{t[2]}"))


def check_selector(text: str) -> None:
    t0 = time.process_time()
    try:
        chosen = resolve_selector(text, SELECTOR_PATTERN)
    except SelectorError as e:
        msg = str(e)
        assert "\n" not in msg and (msg.startswith(("selector ", "empty tap selector"))), msg
        assert e.position is not None and 0 <= e.position <= len(text), (e.position, text)
    else:
        assert chosen == sorted(set(chosen)) and chosen and all(0 <= p < len(names) for p in chosen)
    assert time.process_time() - t0 < SLOW_CALL_S


@pytest.mark.slow
@FUZZ
@given(st.text(alphabet=SELECTOR_CHARS, max_size=30) | st.text(max_size=20)
       | st.lists(selector_items | st.sampled_from(["final", "embed", "Final", "emb", ""]), min_size=1,
                  max_size=4).map(", ".join))
def test_any_string_is_a_selection_or_a_selector_error(text: str) -> None:
    check_selector(text)


@pytest.mark.slow
@CHECK
@given(selector_items)
def test_one_item_selects_what_python_indexing_says(item: str) -> None:
    layers = list(range(len(SELECTOR_PATTERN)))
    pools = {k: [ly.index for ly in SELECTOR_PATTERN if ly.family == k] for k in "AEMR"} | {"L": layers}
    try:
        got = [p - 1 for p in resolve_selector(item, SELECTOR_PATTERN)]
    except SelectorError:
        got = None
    pool = pools.get(item[0])
    if pool is None:
        assert got is None
        return
    rest = item[1:]
    if not rest:
        expected = pool
    elif ":" not in rest:
        i = int(rest)
        expected = [pool[i]] if -len(pool) <= i < len(pool) else None
    else:
        lo, hi = rest.split(":")
        if not lo and not hi:
            expected = None  # documented: a slice needs a bound
        else:
            expected = pool[int(lo) if lo else None:int(hi) if hi else None] or None
    assert got == expected, item
