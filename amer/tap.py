"""Typed hidden-state taps and the selector language that picks them.

The model records every block's output unconditionally in its layer loop (a collector under the
wrong branch would silently disable STP); selection happens afterwards, here.

Tap positions in a full :class:`TapSet` are depth order: 0 is the embedding output, then every residual layer's
output and the final-norm output last. A block alone in its residual layer has one tap (layer ``l`` of a pattern
without brackets at position ``l + 1``); a parallel layer ``[AM]`` has a tap per branch (``A0``, ``M0``: the stream
as that branch alone would leave it) and then the layer's own (``A0+M0``, the stream the next layer reads), which
``L<depth>`` selects. Depth trajectories (:attr:`TapSet.residual_stream`) walk the layer taps, never the branches.

Selectors (comma-separated, order-insensitive; duplicates and empty selections are errors)::

    A        every attention block          A0     the first attention block
    A-1      the last attention block       M1:3   mamba family indices 1 and 2 (M1: from M1 on, M:-1 all
    L7       residual layer 7 (L-1: last)   L2:5   residual layers 2, 3, 4                but the last)
    L        every residual layer           final  the post-final-norm state      embed  the embedding output
    A.swa    every attention block of the variant 'swa' (A.swa-1: the last of them; indices count within it)

Nothing else is accepted: names are lower case (``Final`` and ``emb`` are errors), a slice has at least one
bound (``R:`` is an error; ``R`` is every recurrent block), indices are ASCII digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from torch import Tensor

from amer.errors import SelectorError
from amer.families import Family, families, get_family, letters
from amer.pattern import Pattern

__all__ = ["Tap", "TapSet", "TapPositions", "SelectorError", "resolve_selector", "tap_names", "tap_label",
           "tap_positions", "last_of_each_family"]


class Tap(NamedTuple):
    """One recorded hidden state. ``hidden`` is (B, T, D) on the autograd graph (never detached)."""

    layer: int  # absolute block index (a parallel layer's: its last branch's); -1 embedding, n_layers final norm
    family: Family | None  # None for the embedding, final and parallel-layer taps
    index: int  # index within the family (0 for embedding/final)
    hidden: Tensor  # (B, T, D)
    kind: str = "block"  # "embed" | "block" | "branch" | "layer" | "final"
    tag: str = ""  # a parallel layer's tap: its branches' names joined by '+' ("A0+M0")

    @property
    def name(self) -> str:
        """Stable name: ``embed``, ``A0``, ``M3``, ``A0+M0`` (a parallel layer), ``final``."""
        if self.kind == "layer":
            return self.tag
        return self.kind if self.kind not in ("block", "branch") else f"{self.family.value}{self.index}"

    @property
    def label(self) -> str:
        """What boundary types are made of: ``embed``, ``A``, ``M``, ``E``, ``R``, ``[AM]``, ``final``."""
        return tap_label(self.name)


class TapPositions(NamedTuple):
    """Where each tap of a pattern sits in a full :class:`TapSet`."""

    block: tuple[int, ...]  # per block index: its tap (a branch's own in a parallel layer)
    layer: tuple[int, ...]  # per residual layer: the tap of the stream after it
    final: int
    names: tuple[str, ...]  # every position's name


def tap_positions(pattern: Pattern) -> TapPositions:
    """The tap positions of ``pattern`` (see the module docstring). Not cached: a loop over the layers, called
    inside compiled regions (``TapSet.at``), where dynamo would trace through a cache wrapper and warn."""
    names, block, layer = ["embed"], [], []
    for blocks in pattern.residual_layers:
        for b in blocks:
            block.append(len(names))
            names.append(b.name)
        if len(blocks) > 1:
            names.append("+".join(b.name for b in blocks))
        layer.append(len(names) - 1)
    names.append("final")
    return TapPositions(tuple(block), tuple(layer), len(names) - 1, tuple(names))


def tap_names(pattern: Pattern) -> list[str]:
    """Names of every tap position of a pattern, in depth order."""
    return list(tap_positions(pattern).names)


def tap_label(name: str) -> str:
    """What a tap name reports under: its family letter (``A3`` -> ``A``), a parallel layer's letters in brackets
    (``A0+M0`` -> ``[AM]``), or ``embed`` / ``final``."""
    if "+" in name:
        return "[" + "".join(part[0] for part in name.split("+")) + "]"
    return name if name in ("embed", "final") else name[0]


def last_of_each_family(pattern: Pattern) -> str:
    """The selector of the last block of each family present, in registry order: ``"A-1,M-1,E-1,R-1"``."""
    present = {layer.family.value for layer in pattern.layers}
    return ",".join(f"{s.letter}-1" for s in families() if s.letter in present)


_ITEM = re.compile(r"^(?P<kind>[A-Z])(?:\.(?P<variant>[a-z][a-z_]*))?"
                   r"(?:(?P<idx>-?[0-9]+)|(?P<lo>-?[0-9]+)?(?P<colon>:)(?P<hi>-?[0-9]+)?)?$")
_NAMED = ("final", "embed")
_MAX_DIGITS = 9  # an index past any possible layer; longer numbers are refused before int() reads them


def _help() -> str:
    first = letters()[0]
    return (f"expected {'|'.join(letters())} (every block of the family) optionally with an index "
            f"({first}0, {first}-1) or a slice ({first}1:3, {first}1:, {first}:-1), L<layer> (L7, L-1, L2:5; "
            "L alone: every block), 'final' or 'embed'")


def _shown(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _range_text(fam_name: str, letter: str, n: int) -> str:
    return f"{fam_name} blocks {letter}0..{letter}{n - 1}" if n > 1 else f"one {fam_name} block {letter}0"


def _items(selector: str) -> Iterator[tuple[str, int]]:
    """Each comma-separated item, stripped, with the position of its first character in ``selector``."""
    start = 0
    for raw in selector.split(","):
        item = raw.strip()
        lead = len(raw) - len(raw.lstrip())
        yield item, start + (lead if item else 0)
        start += len(raw) + 1


def _unknown(selector: str, item: str, pos: int) -> SelectorError:
    low = item.lower()
    up = _ITEM.match(item.upper())
    if low in _NAMED or low in ("emb", "embedding", "embeddings", "last", "final_norm"):
        hint = f"; did you mean {'embed' if low.startswith('emb') else 'final'!r}? (names are lower case)"
    elif up and up["kind"] in letters() + "L":
        hint = f"; did you mean {item.upper()!r}?"
    else:
        hint = ""
    return SelectorError(f"selector {_shown(selector)}: unknown item {_shown(item)} at position {pos}{hint}; {_help()}",
                         pos)


def _pick(pool: list[int], m: re.Match, item: str, where: str, pos: int, selector: str) -> list[int]:
    """The layers of ``pool`` chosen by an item's index or slice (``where`` says what the pool holds)."""
    nothing = f"selector {_shown(item)} selects nothing: {where} (position {pos} in {_shown(selector)})"
    if m["idx"] is not None:
        if len(m["idx"].lstrip("-")) > _MAX_DIGITS or not -len(pool) <= int(m["idx"]) < len(pool):
            raise SelectorError(nothing, pos)
        return [pool[int(m["idx"])]]
    if m["colon"] is None:
        return pool
    if m["lo"] is None and m["hi"] is None:
        raise SelectorError(f"selector {_shown(selector)}: {item!r} at position {pos} is a slice without bounds; "
                            f"write {item[0]!r} for every block, or bound it like {item[0]}1: or {item[0]}:-1", pos)
    bounds = [None if b is None else max(-10**_MAX_DIGITS, min(10**_MAX_DIGITS, int(b[:_MAX_DIGITS + 2])))
              for b in (m["lo"], m["hi"])]
    layers = pool[bounds[0]:bounds[1]]
    if not layers:
        raise SelectorError(nothing, pos)
    return layers


def resolve_selector(selector: str, pattern: Pattern) -> list[int]:
    """Tap positions (depth order, see module doc) chosen by ``selector`` on ``pattern``. Errors are
    :class:`SelectorError` naming the item and its character position."""
    if not isinstance(selector, str) or not selector.strip():
        raise SelectorError(f"empty tap selector; {_help()}", 0)
    where = tap_positions(pattern)
    L = pattern.depth
    chosen: dict[int, tuple[str, int]] = {}
    for item, pos in _items(selector):
        if not item:
            raise SelectorError(f"selector {_shown(selector)} has an empty item at position {pos} (stray comma)", pos)
        if item in _NAMED:
            positions = [where.final] if item == "final" else [0]
        else:
            m = _ITEM.match(item)
            if not m or (m["kind"] != "L" and m["kind"] not in letters()) or (m["kind"] == "L" and m["variant"]):
                raise _unknown(selector, item, pos)
            kind = m["kind"]
            if kind == "L":
                pool = list(range(L))
                what = f"the pattern has layers L0..L{L - 1}"
            else:
                # the spec, not Family(kind): selection also runs inside torch.compile'd loss functions
                fam_name = get_family(kind).name
                pool = [layer.index for layer in pattern.layers if layer.family == kind]
                if not pool:
                    raise SelectorError(
                        f"selector {item!r} selects nothing: the pattern {pattern.letters!r} has no "
                        f"{fam_name} ({kind}) blocks (position {pos} in {_shown(selector)})", pos)
                what = f"the pattern has {_range_text(fam_name, kind, len(pool))}"
                if m["variant"]:  # A.swa: the family's layers of that variant, indexed among themselves
                    pool = [i for i in pool if pattern.layers[i].variant == m["variant"]]
                    if not pool:
                        have = sorted({v for layer in pattern.layers if layer.family == kind
                                       and (v := layer.variant) is not None})
                        raise SelectorError(
                            f"selector {item!r} selects nothing: the pattern has no {kind}.{m['variant']} blocks "
                            f"(variants of {kind}: {', '.join(have) or 'none'}; position {pos} in "
                            f"{_shown(selector)})", pos)
                    what = f"the pattern has {len(pool)} {kind}.{m['variant']} block(s)"
            at = where.layer if kind == "L" else where.block
            positions = [at[li] for li in _pick(pool, m, item, what, pos, selector)]
        for p in positions:
            if p in chosen:
                name = where.names[p]
                first, first_pos = chosen[p]
                raise SelectorError(f"selector {_shown(selector)} selects tap {name} twice (by {first!r} at position "
                                    f"{first_pos} and {item!r} at position {pos})", pos)
            chosen[p] = (item, pos)
    return sorted(chosen)


class TapSet(Sequence[Tap]):
    """The taps of one forward pass, in depth order, with selection by the selector language."""

    def __init__(self, taps: list[Tap], pattern: Pattern, positions: list[int] | None = None) -> None:
        self._taps = taps
        self.pattern = pattern
        # positions[i] is the full-set position of taps[i] (a partial recording keeps a subset)
        self._positions = positions if positions is not None else list(range(len(taps)))
        self._by_pos = dict(zip(self._positions, taps))

    def __len__(self) -> int:
        return len(self._taps)

    def __getitem__(self, i):  # type: ignore[override]
        return self._taps[i]

    def __iter__(self) -> Iterator[Tap]:
        return iter(self._taps)

    def __repr__(self) -> str:
        return f"TapSet({', '.join(t.name for t in self._taps)})"

    @property
    def blocks(self) -> list[Tap]:
        """Every block's own tap (a parallel layer's branches included, its combined tap not)."""
        return [t for t in self._taps if t.kind in ("block", "branch")]

    @property
    def embed(self) -> Tap:
        return self._at(0, "embed")

    @property
    def final(self) -> Tap:
        return self._at(tap_positions(self.pattern).final, "final")

    @property
    def residual_stream(self) -> list[Tap]:
        """Embedding then every residual layer's output: the states depth curvature walks along (a parallel
        layer's branch taps are not on it)."""
        return [t for t in self._taps if t.kind not in ("final", "branch")]

    def _at(self, pos: int, name: str) -> Tap:
        if pos not in self._by_pos:
            raise SelectorError(f"tap {name} was not recorded in this forward pass (call the model with taps=True)")
        return self._by_pos[pos]

    def select(self, selector: str) -> list[Tap]:
        """Taps chosen by ``selector`` (e.g. ``"A-1,M-1,E-1,R-1"``), in depth order."""
        return self.at(resolve_selector(selector, self.pattern))

    def at(self, positions: Sequence[int]) -> list[Tap]:
        """The taps at full-set ``positions`` (what :func:`resolve_selector` returns: resolve a selector
        once, then read every forward pass's taps with this)."""
        names = tap_names(self.pattern)
        return [self._at(p, names[p]) for p in positions]
