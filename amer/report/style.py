"""Plotting conventions shared by amer's figures (the curvature report and the training curves): family
colours from the registry, the two taps that belong to no family, and the reference levels of ``1 - cos``.

Reference levels. Every curvature amer measures is ``1 - cos`` between two consecutive chords of a
trajectory (:mod:`amer.stp`). Two null trajectories give fixed values, whatever the width or stride:

- a **random walk** (independent increments): the chords are independent directions, ``cos ~ 0`` in high
  dimension, so ``1 - cos ~ 1.0``;
- **i.i.d. noise** (independent points): consecutive chords ``b - a`` and ``c - b`` share the point ``b``
  with opposite signs, ``E[(b - a)·(c - b)] = -E|b - mu|^2`` against norms of ``2 E|b - mu|^2``, so
  ``cos ~ -1/2`` and ``1 - cos ~ 1.5``.

In degrees (the unit of the literature): a random walk bends by 90 degrees on average, i.i.d. noise by 120
(``acos(-1/2)``); ``unit="angle"`` draws those.

Both levels hold for the token trajectory of one tap (token curvature at any stride, and the STP loss,
whose spans ``s < r < t`` are chords of the same sequence). Depth curvature compares the *updates* two
consecutive blocks write into the residual stream: independent updates give 1.0 again, but 1.5 is not
its i.i.d. level (the residual stream accumulates, and the first boundary ``embed->X`` starts at the
origin, where independent states give ``1 + 1/sqrt(2) ~ 1.71``), so depth panels carry the 1.0 line only.
``tests/test_plot.py`` checks both levels against the estimators themselves.
"""

from __future__ import annotations

from typing import Any

from amer.families import families

__all__ = ["ENDS", "UNREGISTERED_COLOUR", "RANDOM_WALK", "IID_NOISE", "RANDOM_WALK_DEG", "IID_NOISE_DEG", "palette",
           "colour_of", "reference_lines"]

# The two taps around the blocks, which belong to no family: label and colour.
ENDS = {"embed": ("embedding", "#7f7f7f"), "final": ("final norm", "#111111")}
# A family the registry does not know (a figure of a run made while a plug-in family was registered).
UNREGISTERED_COLOUR = "#bcbd22"

RANDOM_WALK = 1.0  # 1 - cos of independent chords
IID_NOISE = 1.5  # 1 - cos of chords that share an i.i.d. middle point (cos = -1/2)
RANDOM_WALK_DEG = 90.0  # the same two levels as mean angles
IID_NOISE_DEG = 120.0


def palette() -> dict[str, str]:
    """Plot colour of every registered family letter and of the ``embed`` and ``final`` taps."""
    return {**{s.letter: s.colour for s in families()}, **{k: colour for k, (_, colour) in ENDS.items()}}


def colour_of(key: str, colours: dict[str, str] | None = None) -> str:
    """The colour of a family letter, ``embed`` or ``final`` (a fallback for one the registry lacks)."""
    return (colours if colours is not None else palette()).get(key, UNREGISTERED_COLOUR)


def reference_lines(ax: Any, *, iid: bool = True, unit: str = "one_minus_cos") -> None:
    """Dotted horizontal lines at 1.0 (random walk) and, with ``iid``, 1.5 (i.i.d. noise), each labelled at
    the right edge of ``ax`` (``unit="angle"``: 90 and 120 degrees). Pass ``iid=False`` on depth-curvature
    panels (see the module docstring)."""
    walk, iid_level = (RANDOM_WALK_DEG, IID_NOISE_DEG) if unit == "angle" else (RANDOM_WALK, IID_NOISE)
    levels = [(walk, "random walk")] + ([(iid_level, "i.i.d. noise")] if iid else [])
    trans = ax.get_yaxis_transform()  # x in axes fraction, y in data
    for level, name in levels:
        text = f"{level:.0f}° {name}" if unit == "angle" else f"{level:.1f} {name}"
        ax.axhline(level, color="0.45", lw=0.8, ls=(0, (4, 3)), zorder=0.5, label=text, gid="reference")
        ax.text(0.995, level, text, transform=trans, ha="right", va="bottom", fontsize=7, color="0.35", zorder=0.6)
