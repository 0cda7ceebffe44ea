"""The pattern language: a string such as ``AEMEAEMEAEMR@52`` names a stack of blocks.

Grammar::

    pattern := item+ ['@' DEPTH]        # '@52' tiles the items cyclically to 52 residual layers
    item    := layer | '(' item+ ')' '*' COUNT | '|'
    layer   := block | '[' block block+ ']'   # '[AM]': one residual layer whose blocks run side by side
    block   := FAMILY ['.' VARIANT] [':' SHARE]   # 'A.swa': attention built from the variant 'swa' of its config
    SHARE   := [a-z][a-z0-9_]*          # 'A:z': every block named z uses one set of parameters
    FAMILY  := a registered family letter (see amer.families): A, M, E, R, G, S, C built in
    VARIANT := [a-z][a-z_]*             # declared as [model.<family>.variants.<name>] (no digits: A.swa0 is
                                        # the selector of the first A.swa)

A *parallel layer* ``[AM]`` (Falcon-H1's hybrid heads) is one residual layer: every block in it (a *branch*) reads
the same normed input and the layer adds the sum of their updates to the stream. Its brackets hold blocks only (no
groups, stage marks or nested brackets); it repeats like any layer: ``([AM]E)*24``, ``[AM]E@12``. Every branch is a
block of :attr:`Pattern.layers` with its own family index (``A0``, ``M0``); :attr:`LayerSpec.depth` is its residual
layer and :attr:`LayerSpec.branch` its place in it (None for a block alone), and :attr:`Pattern.depth` counts the
residual layers. A pattern without brackets has one block per residual layer, so ``index == depth``.

A *shared block* ``A:z`` (Zamba's shared attention) names its parameters: every block with the share name ``z`` is
one set of parameters used at several depths (:attr:`LayerSpec.share`); all uses of a name are one family and
variant. Each use is still a block of its own: its family index, tap and decoding cache.

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
from amer.pattern_parse import MAX_LAYERS, Parser, expand, shown
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

@dataclass(frozen=True)
class LayerSpec:
    """One block of the stack: absolute block index, family, index within the family, stage, its variant, the
    residual layer it belongs to (``depth``) and its place in a parallel layer (``branch``, None when alone)."""

    index: int
    family: Family
    family_index: int
    stage: int
    variant: str | None = None  # the family's named variant this layer is built from (``A.swa``), or None
    depth: int = -1  # the residual layer; -1 (the default) means the block index (a stack without brackets)
    branch: int | None = None
    share: str | None = None  # the share name of a shared block (``A:z``), or None

    def __post_init__(self) -> None:
        if self.depth < 0:
            object.__setattr__(self, "depth", self.index)

    @property
    def name(self) -> str:
        """``A0``, ``M3``...: family letter plus family index (variants share their family's count)."""
        return f"{self.family.value}{self.family_index}"

    @property
    def key(self) -> str:
        """What the pattern writes for this layer: ``A`` or ``A.swa``."""
        return self.family.value if self.variant is None else f"{self.family.value}.{self.variant}"

    @property
    def written(self) -> str:
        """The block as the canonical pattern writes it: its key and share name (``A.swa:z``)."""
        return self.key if self.share is None else f"{self.key}:{self.share}"


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: every block in depth order and the stage it belongs to."""

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
    def depth(self) -> int:
        """The number of residual layers (a parallel layer counts once)."""
        return self.layers[-1].depth + 1

    @property
    def residual_layers(self) -> list[tuple[LayerSpec, ...]]:
        """The blocks of each residual layer, in depth order (one block, or a parallel layer's branches)."""
        out: list[list[LayerSpec]] = [[] for _ in range(self.depth)]
        for layer in self.layers:
            out[layer.depth].append(layer)
        return [tuple(blocks) for blocks in out]

    @property
    def letters(self) -> str:
        """The expanded stack, stages separated by ``|`` (a canonical form that parses back to the same layers):
        ``AEMR``, ``[AM]E``, or with variants ``A.swa EA.swa E`` (a space ends a variant name before the next
        letter)."""
        out, stage = [], 0
        for blocks in self.residual_layers:
            if blocks[0].stage != stage:
                out.append("|")
                stage = blocks[0].stage
            if out and (out[-1][-1:].islower() or out[-1][-1:] in "_0123456789" and out[-1][-1:]):
                out.append(" ")
            if len(blocks) == 1 and blocks[0].branch is None:
                out.append(blocks[0].written)
            else:
                out.append("[" + " ".join(b.written for b in blocks) + "]"
                           if any(b.variant or b.share for b in blocks) else "[" + "".join(b.key for b in blocks) + "]")
        return "".join(out)

    def count(self, family: Family | str) -> int:
        return sum(1 for layer in self.layers if layer.family == family)

    def of_family(self, family: Family | str) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer.family == family]

    def stage_layers(self, stage: int) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer.stage == stage]

    def __str__(self) -> str:
        return self.letters


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
        raise PatternError(f"pattern {shown(text)} is empty; {expected_text()}, e.g. 'AEMR' or '(AEME)*3R'", 0)
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
                f"{e} (and there is no preset named {shown(stripped)}{hint}; presets: {', '.join(names) or 'none'})",
                e.position,
            ) from None
        if preset is not None:
            raise PatternError(f"preset {preset!r}: {e}", e.position) from None
        raise


def _parse(text: str, preset: str | None) -> Pattern:
    parser = Parser(text)
    if not parser.chars:
        raise PatternError(f"pattern {shown(text)} is empty; {expected_text()}", 0)
    nodes, depth, depth_pos = parser.parse()
    n, _ = parser.size(nodes)
    if n == 0:
        raise parser.err("no blocks", parser.chars[0][0], expected_text())
    flat = expand(nodes)
    bars = [pos for kind, pos, _ in flat if kind == "bar"]
    if depth is not None:
        if bars:
            raise PatternError(
                f"pattern {shown(text)}: '@{depth}' at position {depth_pos} conflicts with the '|' stage boundary "
                f"at position {bars[0]}; cyclic tiling would move the boundaries, so write the stages out, "
                "e.g. '(AEME)*2|(AEME)*2'",
                depth_pos,
            )
        if depth > MAX_LAYERS:
            raise parser.err(f"'@{depth}' exceeds the {MAX_LAYERS}-layer limit", depth_pos)
        cycle = [entry for entry in flat if entry[0] == "layer"]
        flat = [cycle[i % len(cycle)] for i in range(depth)]
        if sum(len(entry[2]) for entry in flat) > MAX_LAYERS:
            raise parser.err(f"'@{depth}' expands to more than {MAX_LAYERS} blocks", depth_pos)
    # stage boundaries: no empty stage anywhere
    layers: list[LayerSpec] = []
    counts: dict[Family, int] = {}
    shares: dict[str, tuple[str, int]] = {}  # share name -> (the block its first use writes, its position)
    stage, stage_len, last_bar, n_deep = 0, 0, None, 0
    for kind, pos, branches in flat:
        if kind == "bar":
            if stage_len == 0:
                raise parser.err("empty pipeline stage", pos, "'|' must separate non-empty runs of blocks")
            stage, stage_len, last_bar = stage + 1, 0, pos
            continue
        for j, (fam, bpos, variant, share) in enumerate(branches):
            idx = counts.get(fam, 0)
            counts[fam] = idx + 1
            spec = LayerSpec(len(layers), fam, idx, stage, variant, n_deep, j if len(branches) > 1 else None, share)
            if share is not None:
                first = shares.setdefault(share, (spec.key, bpos))
                if first[0] != spec.key:
                    raise parser.err(f"shared block ':{share}' is {first[0]} at position {first[1]} and {spec.key}",
                                     bpos, "every use of a share name is one family and variant")
            layers.append(spec)
        n_deep += 1
        stage_len += 1
    if stage_len == 0:
        raise parser.err("empty pipeline stage", last_bar, "a pattern cannot end with '|'")
    return Pattern(source=text, layers=tuple(layers), preset=preset)
