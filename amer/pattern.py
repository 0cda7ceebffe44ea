"""The pattern language: a string such as ``AEMEAEMEAEMR@52`` names a stack of blocks.

Grammar::

    pattern := item+ ['@' DEPTH]        # '@52' tiles the items cyclically to 52 layers
    item    := block | '(' item+ ')' '*' COUNT | '|'
    block   := FAMILY ['.' VARIANT]     # 'A.swa': attention built from the variant 'swa' of its config
    FAMILY  := a registered family letter (see amer.families): A, M, E, R, G, S, C built in
    VARIANT := [a-z][a-z_]*             # declared as [model.<family>.variants.<name>] (no digits: A.swa0 is
                                        # the selector of the first A.swa)

Whitespace is ignored, ``|`` marks a pipeline-stage boundary (Megatron-Core's hybrid pattern
convention) and a string that is not a pattern is looked up as a preset (``amer/patterns/*.toml``,
shipped with the package and linked from the repository's top-level ``patterns/``).
Every error is a :class:`PatternError` naming the offending character and its position. Megatron-Core's hybrid
layer patterns and transformers' layer-type lists translate to patterns (:func:`from_megatron`,
:func:`from_layer_types`, in :mod:`amer.translate`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from amer.configio import suggest
from amer.errors import PatternError
from amer.families import Family, expected_text, letters
from amer.presets import load_preset, patterns_dir, preset_names, preset_path
from amer.translate import from_layer_types, from_megatron

__all__ = [
    "MAX_LAYERS",
    "Family",
    "LayerSpec",
    "Pattern",
    "PatternError",
    "from_layer_types",
    "from_megatron",
    "load_preset",
    "parse_pattern",
    "patterns_dir",
    "preset_names",
]

MAX_LAYERS = 4096  # guards against '(A)*999999999' eating the machine


@dataclass(frozen=True)
class LayerSpec:
    """One block of the stack: absolute depth index, family, index within the family, stage."""

    index: int
    family: Family
    family_index: int
    stage: int
    variant: str | None = None  # the family's named variant this layer is built from (``A.swa``), or None

    @property
    def name(self) -> str:
        """``A0``, ``M3``...: family letter plus family index (variants share their family's count)."""
        return f"{self.family.value}{self.family_index}"

    @property
    def key(self) -> str:
        """What the pattern writes for this layer: ``A`` or ``A.swa``."""
        return self.family.value if self.variant is None else f"{self.family.value}.{self.variant}"


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: every layer in depth order and the stage it belongs to."""

    source: str
    layers: tuple[LayerSpec, ...]
    preset: str | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerSpec]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerSpec:
        return self.layers[i]

    @property
    def n_stages(self) -> int:
        return self.layers[-1].stage + 1

    @property
    def letters(self) -> str:
        """The expanded stack, stages separated by ``|`` (a canonical form that parses back to the same layers):
        ``AEMR``, or with variants ``A.swa EA.swa E`` (a space ends a variant name before the next letter)."""
        out, stage = [], 0
        for layer in self.layers:
            if layer.stage != stage:
                out.append("|")
                stage = layer.stage
            if out and (out[-1][-1:].islower() or out[-1].endswith("_")):
                out.append(" ")
            out.append(layer.key)
        return "".join(out)

    def count(self, family: Family | str) -> int:
        return sum(1 for layer in self.layers if layer.family == family)

    def of_family(self, family: Family | str) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer.family == family]

    def stage_layers(self, stage: int) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer.stage == stage]

    def __str__(self) -> str:
        return self.letters


# ----------------------------------------------------------------------------------------------
# parser: tokens are (kind, value, position); the item tree is built with bounded recursion (groups nest
# at most MAX_NESTING deep), and its size (letters and stage bars) is counted arithmetically before
# anything is expanded, so '(A)*999999999' or '((|)*99999)*99999' fails at once instead of allocating.

MAX_NESTING = 64
_Node = tuple  # ("fam", Family, pos, variant) | ("bar", None, pos) | ("group", [nodes], count, pos)


def _shown(text: str, limit: int = 60) -> str:
    """A pattern as quoted in a message: long ones are cut (the position still counts in the full string)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"  # str.isdigit() also accepts '²' and other scripts' digits, which int() then refuses


class _Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        # keep positions relative to the original string: skip whitespace while reading
        self.chars = [(i, c) for i, c in enumerate(source) if not c.isspace()]
        self.k = 0
        self.letters = letters()

    def err(self, msg: str, pos: int | None, hint: str = "") -> PatternError:
        where = f" at position {pos}" if pos is not None else ""
        hint = f"; {hint}" if hint else ""
        return PatternError(f"pattern {_shown(self.src)}: {msg}{where}{hint}", pos)

    def peek(self) -> tuple[int, str] | None:
        return self.chars[self.k] if self.k < len(self.chars) else None

    def parse(self) -> tuple[list[_Node], int | None, int | None]:
        items = self.items(top=True)
        depth = depth_pos = None
        nxt = self.peek()
        if nxt is not None and nxt[1] == "@":
            depth_pos = nxt[0]
            self.k += 1
            depth = self.number("'@' needs a layer count like '@52'", depth_pos)
            if depth < 1:
                raise self.err(f"'@{depth}' must be at least 1", depth_pos)
        nxt = self.peek()
        if nxt is not None:
            pos, c = nxt
            if c == ")":
                raise self.err("unbalanced ')': no matching '('", pos)
            if c == "@":
                raise self.err("second '@'", pos, "only one '@DEPTH' is allowed, at the end")
            raise self.err(f"unexpected {c!r} after '@{depth}'", pos, "'@DEPTH' must come last")
        return items, depth, depth_pos

    def number(self, missing: str, pos: int) -> int:
        start = self.k
        digits = ""
        while (p := self.peek()) is not None and _is_digit(p[1]):
            digits += p[1]
            self.k += 1
        if not digits:
            got = self.peek()
            if got is None:
                raise self.err(f"{missing}, found the end", pos)
            if got[1].isdigit() or got[1].isnumeric():
                raise self.err(f"{missing}, found {got[1]!r}", got[0], "counts are written with the digits 0-9")
            raise self.err(f"{missing}, found {got[1]!r}", got[0])
        if len(digits) > 9:
            shown = digits if len(digits) <= 12 else f"{digits[:12]}... ({len(digits)} digits)"
            raise self.err(f"count {shown} is too large (at most {MAX_LAYERS} layers)", self.chars[start][0])
        return int(digits)

    def items(self, top: bool, open_pos: int | None = None, depth: int = 0) -> list[_Node]:
        out: list[_Node] = []
        while (p := self.peek()) is not None:
            pos, c = p
            if c.isupper() and c in self.letters:
                self.k += 1
                out.append(("fam", Family(c), pos, self.variant(c, pos)))
            elif c == "|":
                out.append(("bar", None, pos))
                self.k += 1
            elif c == "(":
                if depth >= MAX_NESTING:
                    raise self.err(f"groups nested more than {MAX_NESTING} deep", pos)
                self.k += 1
                inner = self.items(top=False, open_pos=pos, depth=depth + 1)
                close = self.peek()
                if close is None or close[1] != ")":
                    raise self.err("unbalanced '(': no matching ')'", pos)
                self.k += 1
                star = self.peek()
                if star is None or star[1] != "*":
                    where = star[0] if star else close[0] + 1
                    raise self.err("group without a repeat count", where, "write e.g. '(AEME)*3'")
                self.k += 1
                count = self.number("'*' needs a repeat count like '*3'", star[0])
                if count < 1:
                    raise self.err(f"repeat count '*{count}' must be at least 1", star[0])
                if not inner:
                    raise self.err("empty group '()'", pos)
                out.append(("group", inner, count, pos))
            elif c == ")":
                if top:
                    raise self.err("unbalanced ')': no matching '('", pos)
                return out
            elif c == "@":
                if not top:
                    raise self.err("'@DEPTH' cannot appear inside a group", pos)
                return out
            elif c == "*":
                raise self.err("'*' without a group", pos, "repeat a group, e.g. '(AE)*2'")
            elif c.isalpha() and c.upper() in self.letters:
                raise self.err(f"unknown block {c!r}", pos,
                               f"block letters are upper case, did you mean {c.upper()!r}? {expected_text()}")
            else:
                raise self.err(f"unknown block {c!r}", pos, expected_text())
        if not top:
            raise self.err("unbalanced '(': no matching ')'", open_pos)
        return out

    def variant(self, letter: str, pos: int) -> str | None:
        """The ``.name`` after a family letter, if any (read up to the first character that cannot be in one)."""
        dot = self.peek()
        if dot is None or dot[1] != ".":
            return None
        self.k += 1
        name = ""
        while (p := self.peek()) is not None and (p[1].islower() and p[1].isascii() or p[1] == "_"):
            if not name and p[1] == "_":
                break
            name += p[1]
            self.k += 1
        if not name:
            got = self.peek()
            raise self.err(f"'.' after {letter!r} needs a variant name", dot[0] if got is None else got[0],
                           f"write e.g. '{letter}.swa' (lower case letters and '_', starting with a letter)")
        if len(name) > 32:
            raise self.err(f"variant name {name[:32]!r}... is longer than 32 characters", dot[0] + 1)
        return name

    def size(self, nodes: list[_Node]) -> tuple[int, int]:
        """(layers, stage bars) the nodes expand to, counted without expanding; a group that would take
        either past MAX_LAYERS is an error at its position (a valid pattern has fewer bars than layers)."""
        n_layers = n_bars = 0
        for node in nodes:
            if node[0] == "fam":
                n_layers += 1
            elif node[0] == "bar":
                n_bars += 1
            else:
                inner_layers, inner_bars = self.size(node[1])
                n_layers += inner_layers * node[2]
                n_bars += inner_bars * node[2]
                if n_layers > MAX_LAYERS:
                    raise self.err(f"expands to more than {MAX_LAYERS} layers", node[3])
                if n_bars > MAX_LAYERS:
                    raise self.err(f"expands to more than {MAX_LAYERS} stage boundaries '|'", node[3])
        if n_layers > MAX_LAYERS:
            raise self.err(f"expands to more than {MAX_LAYERS} layers", None)
        return n_layers, n_bars


def _expand(nodes: list[_Node]) -> list[tuple[Family | None, int, str | None]]:
    """Flatten to a list of (family, pos, variant) and (None, pos, None) for stage bars (sizes already bounded)."""
    out: list[tuple[Family | None, int, str | None]] = []
    for node in nodes:
        if node[0] == "fam":
            out.append((node[1], node[2], node[3]))
        elif node[0] == "bar":
            out.append((None, node[2], None))
        else:
            out.extend(_expand(node[1]) * node[2])
    return out


_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def parse_pattern(text: str) -> Pattern:
    """Parse a pattern string (or preset name) into a :class:`Pattern`.

    >>> [layer.name for layer in parse_pattern("(AE)*2M")]
    ['A0', 'E0', 'A1', 'E1', 'M0']
    """
    if not isinstance(text, str):
        raise PatternError(f"pattern must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise PatternError(f"pattern {_shown(text)} is empty; {expected_text()}, e.g. 'AEMR' or '(AEME)*3R'", 0)
    preset = None
    if _NAME_RE.match(stripped) and any(c.islower() for c in stripped) and preset_path(stripped):
        preset = stripped
        inner = load_preset(stripped)["model"]["pattern"]
        if not isinstance(inner, str) or _NAME_RE.match(inner.strip()) and preset_path(inner.strip()):
            raise PatternError(f"preset {stripped!r}: model.pattern must be a pattern string, not another preset")
        text = inner
    try:
        return _parse(text, preset)
    except PatternError as e:
        lower = letters().lower()
        if preset is None and _NAME_RE.match(stripped) and any(c.islower() and c not in lower for c in stripped):
            names = preset_names()
            hint = suggest(stripped, names, cutoff=0.6)
            raise PatternError(
                f"{e} (and there is no preset named {_shown(stripped)}{hint}; presets: {', '.join(names) or 'none'})",
                e.position,
            ) from None
        if preset is not None:
            raise PatternError(f"preset {preset!r}: {e}", e.position) from None
        raise


def _parse(text: str, preset: str | None) -> Pattern:
    parser = _Parser(text)
    if not parser.chars:
        raise PatternError(f"pattern {_shown(text)} is empty; {expected_text()}", 0)
    nodes, depth, depth_pos = parser.parse()
    n, _ = parser.size(nodes)
    if n == 0:
        raise parser.err("no blocks", parser.chars[0][0], expected_text())
    flat = _expand(nodes)
    bars = [pos for fam, pos, _ in flat if fam is None]
    if depth is not None:
        if bars:
            raise PatternError(
                f"pattern {_shown(text)}: '@{depth}' at position {depth_pos} conflicts with the '|' stage boundary "
                f"at position {bars[0]}; cyclic tiling would move the boundaries, so write the stages out, "
                "e.g. '(AEME)*2|(AEME)*2'",
                depth_pos,
            )
        if depth > MAX_LAYERS:
            raise parser.err(f"'@{depth}' exceeds the {MAX_LAYERS}-layer limit", depth_pos)
        blocks = [(fam, variant) for fam, _, variant in flat]
        flat = [(blocks[i % len(blocks)][0], 0, blocks[i % len(blocks)][1]) for i in range(depth)]
    # stage boundaries: no empty stage anywhere
    layers: list[LayerSpec] = []
    counts: dict[Family, int] = {}
    stage, stage_len, last_bar = 0, 0, None
    for fam, pos, variant in flat:
        if fam is None:
            if stage_len == 0:
                raise parser.err("empty pipeline stage", pos, "'|' must separate non-empty runs of blocks")
            stage, stage_len, last_bar = stage + 1, 0, pos
            continue
        idx = counts.get(fam, 0)
        counts[fam] = idx + 1
        layers.append(LayerSpec(len(layers), fam, idx, stage, variant))
        stage_len += 1
    if stage_len == 0:
        raise parser.err("empty pipeline stage", last_bar, "a pattern cannot end with '|'")
    return Pattern(source=text, layers=tuple(layers), preset=preset)
