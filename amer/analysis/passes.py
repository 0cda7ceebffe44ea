"""The two passes of the curvature engine over one batch's taps: each reduces the taps to per-sequence sums
(``(sum, sum of squares, count)`` per ratio column, six moments per correlation column) so the taps can be
freed at once and memory does not grow with the number of batches.

The first pass measures everything that needs nothing but the batch: token curvature in both units, its
normal/tangential decomposition, STP, depth curvature, pairwise cosines, contextual curvature against
entropy, and the moments (states' mean and covariance, chords' mean) the second pass needs. The second pass
measures what needs those statistics: centred and whitened curvature and the baselines (the shuffled text's
taps come from a second forward pass; the noise and the walk are drawn with each tap's covariance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from amer.analysis.anisotropy import Moments, pairwise_cosine_sums, whitening
from amer.analysis.baselines import gaussian_noise, gaussian_walk
from amer.analysis.decomposition import bend_parts, bend_units
from amer.analysis.entropy import contextual_curvature, correlation_moments
from amer.analysis.layout import Layout
from amer.analysis.metrics import depth_states
from amer.analysis.trajectory import chord_weights, depth_bends, token_chords
from amer.stp.triple import sample_spans, span_bends
from amer.tap import Tap

__all__ = ["Sums", "Accumulators", "TapTransform", "first_pass", "second_pass"]


class Sums:
    """Per-sequence sums of one batch, by column key."""

    def __init__(self) -> None:
        self.ratio: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.moments: dict[str, Tensor] = {}

    def add(self, key: str, values: Tensor, weights: Tensor) -> None:
        """Values and 0/1 weights ``(B, n)``: the weighted sum, sum of squares and count per row."""
        v, w = values.double(), weights.double()
        self.add_raw(key, (v * w).sum(1), (v * v * w).sum(1), w.sum(1))

    def add_raw(self, key: str, total: Tensor, squares: Tensor, count: Tensor) -> None:
        self.ratio[key] = (total.double().cpu(), squares.double().cpu(), count.double().cpu())

    def stacked(self, keys: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(B, K) sums, squares and counts in the order of ``keys``."""
        return tuple(torch.stack([self.ratio[k][i] for k in keys], 1) for i in range(3))  # type: ignore[return-value]

    def stacked_moments(self, keys: list[str]) -> Tensor:
        """(B, K, 6) moments in the order of ``keys``."""
        return torch.stack([self.moments[k].cpu() for k in keys], 1)


@dataclass
class Accumulators:
    """What the first pass gathers for the second: per tap the states' moments, per tap and stride the chords'
    sum and count."""

    states: dict[str, Moments] = field(default_factory=dict)
    chord_sum: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    chord_count: dict[tuple[str, int], float] = field(default_factory=dict)


@dataclass
class TapTransform:
    """Per tap, fixed after the first pass: the states' mean and ``Sigma^{1/2}``, ``Sigma^{-1/2}`` (with the
    kept rank), and the mean chord per stride."""

    mean: Tensor
    sqrt_cov: Tensor
    inv_sqrt: Tensor
    rank: int
    chord_mean: dict[int, Tensor]

    @classmethod
    def build(cls, acc: Accumulators, name: str, strides: list[int]) -> TapTransform:
        moments = acc.states[name]
        sqrt_cov, inv_sqrt, rank = whitening(moments.cov())
        chord_mean = {k: (acc.chord_sum[(name, k)] / max(acc.chord_count[(name, k)], 1.0)).float()
                      if (name, k) in acc.chord_sum else torch.zeros_like(moments.mean()).float() for k in strides}
        return cls(moments.mean().float(), sqrt_cov, inv_sqrt, rank, chord_mean)


def first_pass(taps: list[Tap], doc_ids: Tensor, entropy: Tensor | None, lay: Layout, n_spans: int,
               gen: torch.Generator, acc: Accumulators | None) -> Sums:
    """Everything measured from one batch alone (see the module docstring); ``acc`` (when the second pass
    will run) gathers the states' moments and the chords' means."""
    opts = lay.opts
    out = Sums()
    B, T = doc_ids.shape
    valid = (doc_ids >= 0).float()
    if entropy is not None:
        out.add("entropy", entropy, valid)
    for tap in taps:
        h, name = tap.hidden, tap.name
        if acc is not None:
            acc.states.setdefault(name, Moments()).add(h, valid)
        if opts.anisotropy:
            out.add_raw(f"cos_states/{name}", *pairwise_cosine_sums(h, valid))
        for k in lay.strides:
            d1, d2, w = token_chords(h, stride=k, mask=doc_ids)
            parts = bend_parts(d1, d2)
            out.add(f"tok/{name}/s{k}", parts.one_minus_cos, w)
            out.add(f"tok_deg/{name}/s{k}", parts.angle, w)
            for m in ("normal", "tangential", "slowing"):  # over triples whose chords both have a direction
                out.add(f"{m}/{name}/s{k}", getattr(parts, m), w * parts.defined)
            if opts.anisotropy:
                chords = h[:, k:].float() - h[:, :-k].float()
                cw = chord_weights(doc_ids, B, T, k)
                out.add_raw(f"cos_chords/{name}/s{k}", *pairwise_cosine_sums(chords, cw))
                chord_total = (chords * cw[..., None]).sum((0, 1)).double()
                acc.chord_sum[(name, k)] = acc.chord_sum.get((name, k), 0) + chord_total
                acc.chord_count[(name, k)] = acc.chord_count.get((name, k), 0.0) + float(cw.sum())
            if entropy is not None:
                for m, v in (("ent", parts.one_minus_cos), ("ent_deg", parts.angle)):
                    cc, ok = contextual_curvature(v, w, stride=k, window=opts.entropy_window, length=T)
                    out.moments[f"{m}/{name}/s{k}"] = correlation_moments(cc, entropy, ok * valid)
    # STP at the same sampled triples for every tap (as amer.stp.stp_per_layer), kept per sequence
    idx, weight = sample_spans(B, T, n_spans, mask=doc_ids, generator=gen, device=doc_ids.device)
    for tap in taps:
        out.add(f"stp/{tap.name}", span_bends(tap.hidden, idx), weight)
    states, _ = depth_states(taps)
    omc, ang = depth_bends(states)  # (n_boundaries, B, T) each
    for j, b in enumerate(lay.boundary_names):  # each token is its own depth trajectory: only padding is dropped
        out.add(f"depth/{b}", omc[j], valid)
        out.add(f"depth_deg/{b}", ang[j], valid)
    return out


def _add_bends(out: Sums, prefix: str, name: str, k: int, d1: Tensor, d2: Tensor, w: Tensor) -> None:
    omc, angle = bend_units(d1, d2)
    out.add(f"{prefix}/{name}/s{k}", omc, w)
    out.add(f"{prefix}_deg/{name}/s{k}", angle, w)


def second_pass(taps: list[Tap], shuffled: list[Tap] | None, doc_ids: Tensor, lay: Layout,
                transforms: dict[str, TapTransform], gen: torch.Generator) -> Sums:
    """Centred and whitened curvature (anisotropy) and the shuffled / noise / walk baselines of one batch."""
    opts = lay.opts
    out = Sums()
    for i, tap in enumerate(taps):
        name, tf = tap.name, transforms[tap.name]
        shape = tuple(tap.hidden.shape)
        if opts.baselines:
            noise = gaussian_noise(shape, tf.mean, tf.sqrt_cov, gen)
            walk = gaussian_walk(shape, tf.sqrt_cov, gen)
        for k in lay.strides:
            if opts.anisotropy:
                d1, d2, w = token_chords(tap.hidden, stride=k, mask=doc_ids)
                m = tf.chord_mean[k].to(d1.device)
                c1, c2 = d1 - m, d2 - m
                _add_bends(out, "cent", name, k, c1, c2, w)
                _add_bends(out, "white", name, k, c1 @ tf.inv_sqrt, c2 @ tf.inv_sqrt, w)
            if opts.baselines:
                assert shuffled is not None
                for prefix, h in (("shuf", shuffled[i].hidden), ("noise", noise), ("walk", walk)):
                    d1, d2, w = token_chords(h, stride=k, mask=doc_ids)
                    _add_bends(out, prefix, name, k, d1, d2, w)
    return out
