"""The columns of a curvature result: one per (measure, tap, stride), (measure, tap) or (measure, boundary),
plus group columns (families, boundary types) that are sums of basic columns.

Every figure of the report is a pooled ratio ``sum over sequences / count over sequences`` (a mean over
triples, tokens or pairs) or a Pearson correlation from pooled moments, so keeping per-sequence sums of
each basic column is enough to pool any group, to bootstrap over sequences and to pair two models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from amer.families import letters
from amer.tap import Tap

__all__ = ["Options", "Layout", "STRIDED_FIRST", "STRIDED_SECOND", "CORRELATIONS"]

# Measures per tap and stride filled on the first pass over the data (always on / with anisotropy).
STRIDED_FIRST = ("tok", "tok_deg", "normal", "tangential", "slowing")
STRIDED_ANISO_FIRST = ("cos_chords",)
# Measures per tap and stride that need the first pass's statistics (second pass).
STRIDED_BASELINES = ("shuf", "shuf_deg", "noise", "noise_deg", "walk", "walk_deg")
STRIDED_ANISO = ("cent", "cent_deg", "white", "white_deg")
STRIDED_SECOND = STRIDED_BASELINES + STRIDED_ANISO
CORRELATIONS = ("ent", "ent_deg")  # Pearson r of contextual curvature (1 - cos, degrees) with entropy


@dataclass(frozen=True)
class Options:
    """What a result measures beyond token/depth curvature, STP and the decomposition."""

    baselines: bool = True
    anisotropy: bool = True
    entropy: bool = True
    entropy_window: int = 8

    @property
    def second_pass(self) -> bool:
        return self.baselines or self.anisotropy


@dataclass
class Layout:
    """Names of every tap, boundary and column, fixed by the first batch's taps."""

    names: list[str]
    kinds: list[str]
    labels: list[str]  # family letter, or "embed"/"final"
    layers: list[int]
    indices: list[int]
    strides: list[int]
    opts: Options
    first: list[str] = field(default_factory=list)  # basic ratio columns of the first pass
    second: list[str] = field(default_factory=list)  # basic ratio columns of the second pass
    corr: list[str] = field(default_factory=list)  # basic moment columns (correlations)
    groups: list[tuple[str, list[int]]] = field(default_factory=list)  # over first + second
    corr_groups: list[tuple[str, list[int]]] = field(default_factory=list)  # over corr

    @classmethod
    def from_taps(cls, taps: Sequence[Tap], strides: list[int], opts: Options) -> Layout:
        lay = cls([t.name for t in taps], [t.kind for t in taps], [t.label for t in taps],
                  [int(t.layer) for t in taps], [int(t.index) for t in taps], strides, opts)
        strided1 = STRIDED_FIRST + (STRIDED_ANISO_FIRST if opts.anisotropy else ())
        strided2 = (STRIDED_BASELINES if opts.baselines else ()) + (STRIDED_ANISO if opts.anisotropy else ())
        lay.first = [f"{m}/{n}/s{k}" for m in strided1 for n in lay.names for k in strides]
        lay.first += [f"stp/{n}" for n in lay.names]
        lay.first += [f"cos_states/{n}" for n in lay.names] if opts.anisotropy else []
        lay.first += [f"{m}/{b}" for m in ("depth", "depth_deg") for b in lay.boundary_names]
        lay.first += ["entropy"] if opts.entropy else []
        lay.second = [f"{m}/{n}/s{k}" for m in strided2 for n in lay.names for k in strides]
        lay.corr = [f"{m}/{n}/s{k}" for m in CORRELATIONS for n in lay.names for k in strides] if opts.entropy else []
        col = {k: i for i, k in enumerate(lay.first + lay.second)}
        ccol = {k: i for i, k in enumerate(lay.corr)}
        for m in ("depth", "depth_deg"):
            by_type: dict[str, list[int]] = {}
            for b, ty in zip(lay.boundary_names, lay.boundary_types):
                by_type.setdefault(ty, []).append(col[f"{m}/{b}"])
            tag = "depth_type" if m == "depth" else "depth_type_deg"
            lay.groups += [(f"{tag}/{ty}", cols) for ty, cols in by_type.items()]
        for fam in lay.families:
            is_fam = [kind == "block" and lab == fam for kind, lab in zip(lay.kinds, lay.labels)]
            members = [n for n, member in zip(lay.names, is_fam) if member]
            for m in strided1 + strided2:
                for k in strides:
                    lay.groups.append((f"fam/{fam}/{m}/s{k}", [col[f"{m}/{n}/s{k}"] for n in members]))
            for m in ("stp",) + (("cos_states",) if opts.anisotropy else ()):
                lay.groups.append((f"fam/{fam}/{m}", [col[f"{m}/{n}"] for n in members]))
            for m, suffix in (("depth", ""), ("depth_deg", "_deg")):
                # a boundary "into" F is the bend where an F block's update follows its predecessor's
                into = [col[f"{m}/{b}"] for j, b in enumerate(lay.boundary_names) if is_fam[j + 1]]
                out_of = [col[f"{m}/{b}"] for j, b in enumerate(lay.boundary_names) if is_fam[j]]
                lay.groups += [(f"fam/{fam}/depth_in{suffix}", into), (f"fam/{fam}/depth_out{suffix}", out_of)]
            if opts.entropy:
                for m in CORRELATIONS:
                    for k in strides:
                        lay.corr_groups.append((f"fam/{fam}/{m}/s{k}", [ccol[f"{m}/{n}/s{k}"] for n in members]))
        return lay

    @property
    def boundary_names(self) -> list[str]:
        return [f"{a}->{b}" for a, b in zip(self.names[:-1], self.names[1:])]

    @property
    def boundary_types(self) -> list[str]:
        return [f"{a}->{b}" for a, b in zip(self.labels[:-1], self.labels[1:])]

    @property
    def families(self) -> list[str]:
        """The block families present, in registry order (so every report lists them alike)."""
        present = {lab for lab, kind in zip(self.labels, self.kinds) if kind == "block"}
        return [f for f in letters() if f in present]

    @property
    def pattern(self) -> str:
        return "".join(lab for lab, kind in zip(self.labels, self.kinds) if kind in ("block", "layer"))

    def all_keys(self) -> list[str]:
        return self.first + self.second + [g for g, _ in self.groups]

    def all_corr_keys(self) -> list[str]:
        return self.corr + [g for g, _ in self.corr_groups]

    def expand(self, basic: np.ndarray) -> np.ndarray:
        """(N, K_basic) per-sequence sums -> (N, K_all) with the group columns appended."""
        extra = [basic[:, cols].sum(axis=1) for _, cols in self.groups]
        return np.concatenate([basic, np.stack(extra, axis=1)], axis=1) if extra else basic

    def expand_corr(self, basic: np.ndarray) -> np.ndarray:
        """(N, K_corr, 6) per-sequence moments -> (N, K_corr_all, 6) with the family groups appended."""
        extra = [basic[:, cols].sum(axis=1) for _, cols in self.corr_groups]
        return np.concatenate([basic, np.stack(extra, axis=1)], axis=1) if extra else basic
