"""Family-specific and block-boundary curvature metrics, and the ``amer curvature`` report.

Two views of how hidden-state trajectories bend:

- **token curvature** of one tap: ``1 - cos`` between consecutive chords along the sequence
  (what STP straightens), averaged per block family;
- **depth curvature** at every block boundary: for each token, ``1 - cos`` between the update
  written by one block and the update written by the next, labelled by the boundary type
  (``A->E``, ``E->M``...). The ends are included: the residual stream is taken to start at the
  origin, so ``embed->X`` compares the embedding vector with the first block's update, and
  ``X->final`` compares the last block's update with what the final norm does to the stream.

Both are ``1 - cos`` in [0, 2]: 0 straight, 1 a right angle (or independent directions), 2 a
reversal.

:func:`evaluate` runs a model over held-out batches and reduces the taps batch by batch to
per-sequence sums (memory does not grow with the number of batches beyond a few numbers per
sequence), then summarises with bootstrap confidence intervals over sequences. :func:`compare`
puts two results side by side; :func:`main` is ``amer curvature``.

Statistics, stated once: a *mean* is pooled over every valid triple (token curvature, STP) or
token (depth curvature) of every sequence, i.e. ``sum over sequences / count over sequences``;
*std* is the pooled standard deviation over those same triples/tokens (the spread of individual
bends, not an error bar); the *95% CI* is the percentile bootstrap of the pooled mean, resampling
whole sequences with replacement (tokens of one sequence are correlated, so resampling tokens
would give intervals that are too narrow).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from amer.stp import _one_minus_cos, depth_curvature_per_token, sample_spans, token_curvature
from amer.analysis.metrics import depth_states, training_metrics  # noqa: F401  (re-exported)
from amer.tap import Tap

__all__ = ["CurvatureError", "depth_states", "training_metrics", "evaluate", "compare", "format_markdown",
           "format_summary", "plot_report", "write_report", "main"]

FAMILY_ORDER = ("A", "M", "E", "R")
FAMILY_NAMES = {"A": "attention", "M": "mamba", "E": "expert", "R": "recurrent", "embed": "embedding",
                "final": "final norm"}
CI_LEVEL = 0.95
FORMAT = "amer-curvature/1"


class CurvatureError(ValueError):
    """Bad input to the curvature report; the one-line message names the problem and what is accepted."""


# ----------------------------------------------------------------------------------------------
# evaluation: per-sequence sums, reduced batch by batch


@dataclass
class _Layout:
    """Names of every tap, boundary and statistic column, fixed by the first batch's taps.

    Basic columns are measured per sequence (token curvature per tap and stride, STP per tap,
    depth curvature per boundary); group columns (boundary types, families) are sums of basic
    columns, so their pooled means and bootstrap replicates come from the same per-sequence data.
    """

    names: list[str]
    kinds: list[str]
    labels: list[str]  # family letter, or "embed"/"final"
    layers: list[int]
    indices: list[int]
    strides: list[int]
    keys: list[str] = field(default_factory=list)  # basic columns, in the order _reduce_batch fills them
    groups: list[tuple[str, list[int]]] = field(default_factory=list)

    @classmethod
    def from_taps(cls, taps: Sequence[Tap], strides: list[int]) -> "_Layout":
        lay = cls([t.name for t in taps], [t.kind for t in taps], [t.label for t in taps],
                  [int(t.layer) for t in taps], [int(t.index) for t in taps], strides)
        lay.keys = ([f"tok/{n}/s{k}" for n in lay.names for k in strides] + [f"stp/{n}" for n in lay.names]
                    + [f"depth/{b}" for b in lay.boundary_names])
        col = {k: i for i, k in enumerate(lay.keys)}
        by_type: dict[str, list[int]] = {}
        for b, ty in zip(lay.boundary_names, lay.boundary_types):
            by_type.setdefault(ty, []).append(col[f"depth/{b}"])
        lay.groups = [(f"depth_type/{ty}", cols) for ty, cols in by_type.items()]
        for fam in lay.families:
            members = [n for n, lab, kind in zip(lay.names, lay.labels, lay.kinds) if kind == "block" and lab == fam]
            for k in strides:
                lay.groups.append((f"fam/{fam}/tok/s{k}", [col[f"tok/{n}/s{k}"] for n in members]))
            lay.groups.append((f"fam/{fam}/stp", [col[f"stp/{n}"] for n in members]))
            # a boundary "into" F is the bend where an F block's update follows its predecessor's
            is_fam = [kind == "block" and lab == fam for kind, lab in zip(lay.kinds, lay.labels)]
            into = [col[f"depth/{b}"] for j, b in enumerate(lay.boundary_names) if is_fam[j + 1]]
            out_of = [col[f"depth/{b}"] for j, b in enumerate(lay.boundary_names) if is_fam[j]]
            lay.groups.append((f"fam/{fam}/depth_in", into))
            lay.groups.append((f"fam/{fam}/depth_out", out_of))
        return lay

    @property
    def boundary_names(self) -> list[str]:
        return [f"{a}->{b}" for a, b in zip(self.names[:-1], self.names[1:])]

    @property
    def boundary_types(self) -> list[str]:
        return [f"{a}->{b}" for a, b in zip(self.labels[:-1], self.labels[1:])]

    @property
    def families(self) -> list[str]:
        present = {lab for lab, kind in zip(self.labels, self.kinds) if kind == "block"}
        return [f for f in FAMILY_ORDER if f in present]

    @property
    def pattern(self) -> str:
        return "".join(lab for lab, kind in zip(self.labels, self.kinds) if kind == "block")

    def all_keys(self) -> list[str]:
        return self.keys + [g for g, _ in self.groups]

    def expand(self, basic: np.ndarray) -> np.ndarray:
        """(N, K_basic) per-sequence sums -> (N, K_all) with the group columns appended."""
        extra = [basic[:, cols].sum(axis=1) for _, cols in self.groups]
        return np.concatenate([basic, np.stack(extra, axis=1)], axis=1) if extra else basic


def _full_taps(taps: Any) -> list[Tap]:
    if taps is None:
        raise CurvatureError("the model returned no taps; call it with taps=True (every block recorded)")
    taps = list(taps)
    kinds = [t.kind for t in taps]
    if len(taps) < 3 or kinds[0] != "embed" or kinds[-1] != "final" or any(k != "block" for k in kinds[1:-1]):
        raise CurvatureError(
            f"curvature needs the full tap recording [embed, every block, final], got {[t.name for t in taps]}")
    return taps


def _check_strides(strides: Iterable[int]) -> list[int]:
    out = [int(s) for s in strides]
    if not out:
        raise CurvatureError("strides must name at least one stride, e.g. (1,) or (1, 4)")
    if any(s < 1 for s in out) or len(set(out)) != len(out):
        raise CurvatureError(f"strides must be distinct integers >= 1, got {out}")
    return sorted(out)


def _reduce_batch(taps: list[Tap], doc_ids: Tensor, lay: _Layout, n_spans: int,
                  gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence (sum, sum of squares, count) of every basic column: three (B, K_basic) fp64 tensors.

    Everything a later summary needs from this batch; the taps can be freed afterwards.
    """
    B, T = doc_ids.shape
    sums: list[Tensor] = []
    sqs: list[Tensor] = []
    cnts: list[Tensor] = []

    def add(values: Tensor, weights: Tensor) -> None:  # (B, n) each
        v, w = values.double(), weights.double()
        sums.append((v * w).sum(1))
        sqs.append((v * v * w).sum(1))
        cnts.append(w.sum(1))

    for tap in taps:
        for k in lay.strides:
            add(*token_curvature(tap.hidden, stride=k, mask=doc_ids, reduce=False))
    # STP at the same sampled triples for every tap (as amer.stp.stp_per_layer), kept per sequence
    idx, weight = sample_spans(B, T, n_spans, mask=doc_ids, generator=gen, device=doc_ids.device)
    flat = idx.view(B, n_spans * 3)
    for tap in taps:
        h = tap.hidden
        picked = h.gather(1, flat.unsqueeze(-1).expand(B, flat.shape[1], h.shape[-1]))
        picked = picked.float().view(B, n_spans, 3, h.shape[-1])
        add(_one_minus_cos(picked[:, :, 1] - picked[:, :, 0], picked[:, :, 2] - picked[:, :, 1]), weight)
    states, _ = depth_states(taps)
    per_token = depth_curvature_per_token(states)  # (n_boundaries, B, T)
    valid = (doc_ids >= 0).float()  # each token is its own depth trajectory: only padding is dropped
    for j in range(per_token.shape[0]):
        add(per_token[j], valid)
    return torch.stack(sums, 1).cpu(), torch.stack(sqs, 1).cpu(), torch.stack(cnts, 1).cpu()


def _resample_weights(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) multiplicities of n sequences drawn with replacement, seeded: one matrix
    product then gives every column's replicate (the vectorised bootstrap)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_bootstrap, n))
    flat = (np.arange(n_bootstrap)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n).reshape(n_bootstrap, n).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _percentile_ci(boot: np.ndarray) -> np.ndarray:
    """(2, K) lower/upper percentile bounds over replicates; NaN where no replicate is defined."""
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    out = np.full((2, boot.shape[1]), np.nan)
    ok = ~np.isnan(boot).all(axis=0)
    if ok.any():
        out[:, ok] = np.nanpercentile(boot[:, ok], [lo, hi], axis=0)
    return out


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    strides: Sequence[int] = (1,),
    n_bootstrap: int = 1000,
    seed: int = 0,
    stp_n_spans: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Token curvature, depth curvature and STP loss of every tap, with 95% bootstrap CIs over sequences.

    Args:
        model: called as ``model(tokens, taps=True)``; must return a :class:`~amer.model.ModelOutput`
            whose taps are the full recording ``[embed, every block, final]``. Run in eval mode
            under ``no_grad`` (its training flag is restored afterwards).
        batches: dicts with ``tokens`` (B, T) and optionally ``doc_ids`` (B, T) (documents keep
            token triples and STP spans inside one document; negative ids are padding), e.g.
            ``PackedDataset.val_batches(...)``.
        strides: token strides ``k`` for triples ``(t, t+k, t+2k)``; a larger stride measures
            longer-range straightness.
        n_bootstrap: bootstrap replicates (resampling sequences) for the confidence intervals.
        seed: seeds the STP span sampler and the bootstrap; same seed and data, same numbers.
        stp_n_spans: STP triples sampled per sequence (the training loss's estimator, with a
            fixed generator so two models evaluated with one seed see the same spans).
        progress: a tqdm bar over batches (shown only on a terminal).

    Returns:
        A JSON-serialisable dict: ``layers`` (per tap: ``token`` per stride, ``stp``),
        ``boundaries`` (per boundary: ``depth``, with ``type`` such as ``A->E``),
        ``boundary_types``, ``families`` (per family: ``token``, ``stp``, ``depth_in``,
        ``depth_out``), run facts, and ``per_sequence`` sums/counts that :func:`compare` uses for
        paired bootstraps. Each statistic is ``{"key", "mean", "std", "ci": [lo, hi], "n"}``
        (see the module docstring for what mean, std and CI are).
    """
    strides = _check_strides(strides)
    if int(n_bootstrap) < 1:
        raise CurvatureError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if int(stp_n_spans) < 1:
        raise CurvatureError(f"stp_n_spans must be >= 1, got {stp_n_spans}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    lay: _Layout | None = None
    gen: torch.Generator | None = None
    sums: list[Tensor] = []
    sqs: list[Tensor] = []
    cnts: list[Tensor] = []
    digest = hashlib.sha256()
    seq_lens: set[int] = set()
    n_tokens = 0
    try:
        for batch in _progress(batches, progress):
            tokens = batch["tokens"]
            if tokens.dim() != 2:
                raise CurvatureError(f"batch tokens must be (B, T), got shape {tuple(tokens.shape)}")
            B, T = tokens.shape
            doc_ids = batch.get("doc_ids")
            doc_ids = torch.zeros_like(tokens) if doc_ids is None else doc_ids
            if doc_ids.shape != tokens.shape:
                raise CurvatureError(f"doc_ids {tuple(doc_ids.shape)} must match tokens {tuple(tokens.shape)}")
            if T < 2 * strides[-1] + 1:
                raise CurvatureError(f"sequence length {T} is too short: token curvature at stride {strides[-1]} "
                                     f"needs T >= {2 * strides[-1] + 1} (and T >= 3 at stride 1)")
            digest.update(np.ascontiguousarray(tokens.cpu().long().numpy()).tobytes())
            digest.update(np.ascontiguousarray(doc_ids.cpu().long().numpy()).tobytes())
            tokens, doc_ids = tokens.to(device), doc_ids.to(device).long()
            taps = _full_taps(model(tokens, taps=True).taps)
            if lay is None:
                lay = _Layout.from_taps(taps, strides)
                gen = torch.Generator(device=device).manual_seed(int(seed))
            elif [t.name for t in taps] != lay.names:
                raise CurvatureError("the model's taps changed between batches")
            s, q, c = _reduce_batch(taps, doc_ids, lay, int(stp_n_spans), gen)
            del taps
            sums.append(s)
            sqs.append(q)
            cnts.append(c)
            seq_lens.add(T)
            n_tokens += int((doc_ids >= 0).sum())
    finally:
        model.train(was_training)
    if lay is None:
        raise CurvatureError("no batches to evaluate: the data yielded no sequences")

    S = lay.expand(torch.cat(sums).numpy())  # (N, K) per-sequence sums
    Q = lay.expand(torch.cat(sqs).numpy())
    C = lay.expand(torch.cat(cnts).numpy())
    keys = lay.all_keys()
    n_seq = S.shape[0]
    total_s, total_q, total_c = S.sum(0), Q.sum(0), C.sum(0)
    mean = _ratio(total_s, total_c)
    std = np.sqrt(np.maximum(_ratio(total_q, total_c) - mean**2, 0.0))
    W = _resample_weights(n_seq, int(n_bootstrap), int(seed))
    ci = _percentile_ci(_ratio(W @ S, W @ C))
    stats = {k: {"key": k, "mean": _num(mean[i]), "std": _num(std[i]), "ci": [_num(ci[0, i]), _num(ci[1, i])],
                 "n": int(round(total_c[i]))} for i, k in enumerate(keys)}

    layers = [{"tap": n, "kind": kind, "family": lab if kind == "block" else None, "layer": layer, "index": index,
               "token": {str(k): stats[f"tok/{n}/s{k}"] for k in strides}, "stp": stats[f"stp/{n}"]}
              for n, kind, lab, layer, index in zip(lay.names, lay.kinds, lay.labels, lay.layers, lay.indices)]
    boundaries = [{"position": j, "name": b, "type": ty, "from": lay.names[j], "to": lay.names[j + 1],
                   "depth": stats[f"depth/{b}"]}
                  for j, (b, ty) in enumerate(zip(lay.boundary_names, lay.boundary_types))]
    types: dict[str, dict[str, Any]] = {}
    for b in boundaries:
        types.setdefault(b["type"], {"n_boundaries": 0, "positions": [], "depth": stats[f"depth_type/{b['type']}"]})
        types[b["type"]]["n_boundaries"] += 1
        types[b["type"]]["positions"].append(b["position"])
    families = {}
    for fam in lay.families:
        families[fam] = {
            "name": FAMILY_NAMES[fam],
            "blocks": [n for n, lab, kind in zip(lay.names, lay.labels, lay.kinds) if kind == "block" and lab == fam],
            "token": {str(k): stats[f"fam/{fam}/tok/s{k}"] for k in strides},
            "stp": stats[f"fam/{fam}/stp"],
            "depth_in": stats[f"fam/{fam}/depth_in"],
            "depth_out": stats[f"fam/{fam}/depth_out"],
        }
    return {
        "format": FORMAT,
        "label": "model",
        "pattern": lay.pattern,
        "taps": lay.names,
        "strides": strides,
        "seed": int(seed),
        "n_bootstrap": int(n_bootstrap),
        "stp_n_spans": int(stp_n_spans),
        "ci_level": CI_LEVEL,
        "n_sequences": n_seq,
        "n_tokens": n_tokens,
        "seq_len": sorted(seq_lens)[0] if len(seq_lens) == 1 else sorted(seq_lens),
        "data_fingerprint": digest.hexdigest()[:16],
        "statistics": {
            "mean": "pooled over every valid triple (token curvature, STP) or token (depth curvature) of every sequence",
            "std": "pooled standard deviation over the same triples / tokens (spread of single bends, not an error bar)",
            "ci": f"{CI_LEVEL:.0%} percentile bootstrap of the mean, resampling whole sequences ({n_bootstrap} replicates)",
            "token": "1 - cos(h[t+k] - h[t], h[t+2k] - h[t+k]) over consecutive triples inside one document, stride k",
            "depth": "1 - cos(update of one block, update of the next) per token; embed->X uses the embedding "
                     "itself as the first update, X->final the final norm's change",
            "stp": f"the STP loss (1 - cos over {stp_n_spans} sampled triples per sequence, fixed generator)",
        },
        "layers": layers,
        "boundaries": boundaries,
        "boundary_types": types,
        "families": families,
        "per_sequence": {"keys": keys, "sum": S.tolist(), "count": C.tolist()},
    }


def _progress(batches: Iterable[Any], progress: bool) -> Iterable[Any]:
    if not progress:
        return batches
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(batches, total=total, unit="batch", desc="curvature", dynamic_ncols=True, disable=None, leave=False)


# ----------------------------------------------------------------------------------------------
# comparison


def _stat_nodes(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        if "key" in node and "mean" in node:
            yield node
        else:
            for v in node.values():
                yield from _stat_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _stat_nodes(v)


def _map_stats(node: Any, fn: Any) -> Any:
    """A copy of a result's structure (layers, boundaries, ...) with every statistic replaced by ``fn(stat)``."""
    if isinstance(node, dict):
        if "key" in node and "mean" in node:
            return fn(node)
        return {k: _map_stats(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_stats(v, fn) for v in node]
    return node


def compare(result_a: Mapping[str, Any], result_b: Mapping[str, Any]) -> dict[str, Any]:
    """Differences ``a - b`` of every statistic of two :func:`evaluate` results, each with a 95% CI.

    When both ran on the same data (same sequences: equal data fingerprints and counts) the
    bootstrap is *paired*: one resampling of sequence indices is applied to both runs, so the
    interval reflects how the two models differ on the same text, not how the text varies (this
    is much tighter than comparing two separate intervals). Otherwise the runs are resampled
    independently. ``excludes_zero`` is True when the interval lies strictly on one side of 0.
    The bootstrap uses ``result_a``'s seed and replicate count. A result compared with itself
    gives 0 with the interval [0, 0].

    Raises :class:`CurvatureError` when the results come from different patterns or strides.
    """
    for r, name in ((result_a, "result_a"), (result_b, "result_b")):
        if not isinstance(r, Mapping) or r.get("format") != FORMAT or "per_sequence" not in r:
            raise CurvatureError(f"{name} is not an amer.curvature.evaluate() result (format {FORMAT})")
    if result_a["pattern"] != result_b["pattern"]:
        raise CurvatureError(
            f"cannot compare different patterns: {result_a['pattern']!r} vs {result_b['pattern']!r}; "
            f"compare two models of one pattern (e.g. trained with STP on vs off)")
    if list(result_a["strides"]) != list(result_b["strides"]):
        raise CurvatureError(f"cannot compare results measured at different strides: {result_a['strides']} vs "
                             f"{result_b['strides']}; evaluate both with the same strides")
    keys = result_a["per_sequence"]["keys"]
    if keys != result_b["per_sequence"]["keys"]:
        raise CurvatureError("cannot compare: the two results measure different statistics")
    Sa, Ca = (np.asarray(result_a["per_sequence"][k], dtype=np.float64) for k in ("sum", "count"))
    Sb, Cb = (np.asarray(result_b["per_sequence"][k], dtype=np.float64) for k in ("sum", "count"))
    paired = result_a["data_fingerprint"] == result_b["data_fingerprint"] and Sa.shape == Sb.shape
    R, seed = int(result_a["n_bootstrap"]), int(result_a["seed"])
    Wa = _resample_weights(Sa.shape[0], R, seed)
    Wb = Wa if paired else _resample_weights(Sb.shape[0], R, seed + 1)
    diff_boot = _ratio(Wa @ Sa, Wa @ Ca) - _ratio(Wb @ Sb, Wb @ Cb)
    ci = _percentile_ci(diff_boot)
    point = _ratio(Sa.sum(0), Ca.sum(0)) - _ratio(Sb.sum(0), Cb.sum(0))
    col = {k: i for i, k in enumerate(keys)}
    b_means = {s["key"]: s["mean"] for s in _stat_nodes(
        [result_b["layers"], result_b["boundaries"], result_b["boundary_types"], result_b["families"]])}

    def diff_of(stat_a: dict[str, Any]) -> dict[str, Any]:
        i = col[stat_a["key"]]
        lo, hi = _num(ci[0, i]), _num(ci[1, i])
        return {"key": stat_a["key"], "a": stat_a["mean"], "b": b_means.get(stat_a["key"]), "diff": _num(point[i]),
                "ci": [lo, hi], "excludes_zero": bool(lo is not None and hi is not None and (lo > 0 or hi < 0))}

    out = {
        "pattern": result_a["pattern"],
        "a": result_a.get("label", "a"),
        "b": result_b.get("label", "b"),
        "difference": "a - b",
        "paired": paired,
        "method": ("paired bootstrap: both runs on the same sequences, resampled together" if paired else
                   "independent bootstrap: the runs saw different data, each resampled separately"),
        "n_bootstrap": R,
        "seed": seed,
        "ci_level": CI_LEVEL,
        "layers": _map_stats(result_a["layers"], diff_of),
        "boundaries": _map_stats(result_a["boundaries"], diff_of),
        "boundary_types": _map_stats(result_a["boundary_types"], diff_of),
        "families": _map_stats(result_a["families"], diff_of),
    }
    return out


# ----------------------------------------------------------------------------------------------
# the report: JSON, Markdown, PNG, terminal summary


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_stat(s: Mapping[str, Any], *, std: bool = True) -> str:
    """``mean ± std [lo, hi]`` (std omitted with ``std=False``)."""
    text = _f(s["mean"])
    if std and s.get("std") is not None:
        text += f" ± {_f(s['std'], 3)}"
    lo, hi = s["ci"]
    return text + f" [{_f(lo)}, {_f(hi)}]"


def _fmt_diff(d: Mapping[str, Any], *, signed: bool = True) -> str:
    lo, hi = d["ci"]
    fmt = (lambda x: "n/a" if x is None else f"{x:+.4f}") if signed else _f
    return f"{fmt(d['diff'])} [{fmt(lo)}, {fmt(hi)}]"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _type_rows(res: Mapping[str, Any]) -> list[list[str]]:
    return [[ty, str(v["n_boundaries"]), _fmt_stat(v["depth"])] for ty, v in res["boundary_types"].items()]


def _family_rows(res: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for fam, v in res["families"].items():
        rows.append([f"{fam} ({v['name']})", str(len(v["blocks"]))] + [_fmt_stat(v["token"][k]) for k in v["token"]]
                    + [_fmt_stat(v["stp"]), _fmt_stat(v["depth_in"]), _fmt_stat(v["depth_out"])])
    return rows


def _family_headers(res: Mapping[str, Any]) -> list[str]:
    return (["family", "blocks"] + [f"token curvature s={k}" for k in res["strides"]]
            + ["STP loss", "depth curvature in", "depth curvature out"])


def _diff_rows(items: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[list[str]]:
    return [[name, stat, _f(d["a"]), _f(d["b"]), _fmt_diff(d), "yes" if d["excludes_zero"] else "no"]
            for name, stat, d in items]


_DIFF_HEADERS = ["", "statistic", "A", "B", "A − B [95% CI]", "CI excludes 0"]


def _family_diff_items(comp: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    items = []
    for fam, v in comp["families"].items():
        items += [(fam, f"token s={k}", d) for k, d in v["token"].items()]
        items += [(fam, "STP loss", v["stp"]), (fam, "depth in", v["depth_in"]), (fam, "depth out", v["depth_out"])]
    return items


def format_markdown(report: Mapping[str, Any]) -> str:
    """``curvature.md``: what was measured and the tables per boundary type, per family, per layer
    (and the comparison tables when the report has one)."""
    cfg, res = report["config"], report["result"]
    comp = report.get("comparison")
    selected = set(cfg.get("stp_selected") or [])
    out = [f"# Curvature report: pattern `{res['pattern']}`", ""]
    out.append(f"- model: `{res['label']}`")
    out.append(f"- data: `{cfg.get('data', '?')}` validation split, {res['n_sequences']} sequences of "
               f"{res['seq_len']} tokens ({res['n_tokens']} tokens), fingerprint `{res['data_fingerprint']}`")
    out.append(f"- seed {res['seed']}, {res['n_bootstrap']} bootstrap replicates, STP estimator with "
               f"{res['stp_n_spans']} spans per sequence, strides {', '.join(map(str, res['strides']))}")
    if selected:
        out.append(f"- STP selection in the {'checkpoint' if cfg.get('checkpoint') else 'preset'} config: "
                   f"{', '.join(cfg['stp_selected'])} (marked * below)")
    out += ["", "All values are `1 - cos` in [0, 2]: 0 straight, 1 a right angle (or unrelated directions), "
                "2 a reversal. Cells read `mean ± std [95% CI]`: the mean is pooled over every triple "
                "(token curvature, STP) or token (depth curvature); std is the spread of single bends; the "
                "interval is a bootstrap over sequences. Depth curvature at `X->Y` is the angle between the update "
                "written by block X and the one written by the next block Y.", ""]
    out += ["## Depth curvature per boundary type", "",
            _md_table(["boundary type", "boundaries", "depth curvature"], _type_rows(res)), ""]
    out += ["## Per family (mean over the family's blocks)", "",
            _md_table(_family_headers(res), _family_rows(res)), ""]
    rows = []
    into = {b["to"]: b for b in res["boundaries"]}
    for i, layer in enumerate(res["layers"]):
        b = into.get(layer["tap"])
        name = layer["tap"] + (" *" if layer["tap"] in selected else "")
        rows.append([str(i), name, FAMILY_NAMES.get(layer["family"] or layer["kind"], "")]
                    + [_fmt_stat(layer["token"][str(k)]) for k in res["strides"]]
                    + [_fmt_stat(layer["stp"]), b["type"] if b else "", _fmt_stat(b["depth"]) if b else ""])
    out += ["## Per layer (depth order)", "",
            _md_table(["#", "tap", "family"] + [f"token curvature s={k}" for k in res["strides"]]
                      + ["STP loss", "boundary into tap", "depth curvature"], rows), ""]
    if comp is not None:
        out += ["## Comparison", "", f"- A: `{comp['a']}`", f"- B: `{comp['b']}`",
                f"- difference A − B with a {comp['ci_level']:.0%} CI: {comp['method']} "
                f"({comp['n_bootstrap']} replicates, seed {comp['seed']}); negative = A is straighter.", ""]
        out += ["### Per boundary type", "", _md_table(
            ["boundary type", "statistic", "A", "B", "A − B [95% CI]", "CI excludes 0"],
            _diff_rows((ty, "depth", v["depth"]) for ty, v in comp["boundary_types"].items())), ""]
        out += ["### Per family", "", _md_table(["family"] + _DIFF_HEADERS[1:],
                                                _diff_rows(_family_diff_items(comp))), ""]
        items = []
        into_c = {b["to"]: b for b in comp["boundaries"]}
        for layer in comp["layers"]:
            items += [(layer["tap"], f"token s={k}", d) for k, d in layer["token"].items()]
            items.append((layer["tap"], "STP loss", layer["stp"]))
            if layer["tap"] in into_c:
                items.append((layer["tap"], f"depth ({into_c[layer['tap']]['type']})", into_c[layer["tap"]]["depth"]))
        out += ["### Per layer", "", _md_table(["tap"] + _DIFF_HEADERS[1:], _diff_rows(items)), ""]
    return "\n".join(out)


def format_summary(report: Mapping[str, Any]) -> str:
    """The terminal summary: depth curvature per boundary type and the per-family table (plus the
    per-type and per-family differences when comparing)."""
    res, comp = report["result"], report.get("comparison")
    parts = [f"curvature of {res['label']} (pattern {res['pattern']}, {res['n_sequences']} sequences x "
             f"{res['seq_len']} tokens; mean ± std [95% CI])", "",
             _text_table(["boundary type", "n", "depth curvature"], _type_rows(res)), "",
             _text_table(_family_headers(res), _family_rows(res))]
    if comp is not None:
        items = [(ty, "depth", v["depth"]) for ty, v in comp["boundary_types"].items()] + _family_diff_items(comp)
        parts += ["", f"A = {comp['a']}", f"B = {comp['b']}", f"A − B ({comp['method']}):", "",
                  _text_table(_DIFF_HEADERS, _diff_rows(items))]
    return "\n".join(parts)


_COLOURS = {"A": "#1f77b4", "M": "#2ca02c", "E": "#d62728", "R": "#9467bd", "embed": "#7f7f7f", "final": "#111111"}


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """``curvature.png``: token curvature per tap (circles) and depth curvature at every boundary
    (diamonds, between the two taps it joins), coloured by family, every boundary marked by a
    vertical line and labelled with its type along the top. A comparison adds hollow markers for
    B and a second panel with A − B and its CI (filled where the CI excludes zero)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    res, comp = report["result"], report.get("comparison")
    res_b = report.get("result_b")
    k0 = str(res["strides"][0])
    n = len(res["layers"])
    xt = np.arange(n, dtype=float)
    xb = np.array([b["position"] + 0.5 for b in res["boundaries"]])
    tap_col = [_COLOURS[lay["family"] or lay["kind"]] for lay in res["layers"]]
    bnd_col = [tap_col[b["position"] + 1] for b in res["boundaries"]]

    fig = Figure(figsize=(max(8.0, 0.32 * n + 3.0), 8.0 if comp else 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if comp else 1, 1, sharex=True, squeeze=False)[:, 0]

    def series(ax: Any, x: np.ndarray, stats: list[Mapping[str, Any]], colours: list[str], marker: str,
               hollow: bool = False, diff: bool = False, dx: float = 0.0, ls: str = "-") -> None:
        val = np.array([np.nan if s[("diff" if diff else "mean")] is None else s["diff" if diff else "mean"]
                        for s in stats])
        lo = np.array([np.nan if s["ci"][0] is None else s["ci"][0] for s in stats])
        hi = np.array([np.nan if s["ci"][1] is None else s["ci"][1] for s in stats])
        ax.plot(x + dx, val, ls, color="0.7", lw=0.8, zorder=1)
        for xi, v, l, h, c, s in zip(x + dx, val, lo, hi, colours, stats):
            fill = "none" if hollow or (diff and not s["excludes_zero"]) else c
            ax.errorbar([xi], [v], yerr=[[max(v - l, 0)], [max(h - v, 0)]], fmt=marker, color=c, mfc=fill,
                        ms=6, capsize=2, lw=1, zorder=3)

    def decorate(ax: Any) -> None:
        for x in xb:
            ax.axvline(x, color="0.88", lw=0.7, zorder=0)
        ax.grid(axis="y", color="0.92", lw=0.6)

    ax = axes[0]
    decorate(ax)
    series(ax, xt, [lay["token"][k0] for lay in res["layers"]], tap_col, "o", dx=-0.08 if res_b else 0.0, ls=":")
    series(ax, xb, [b["depth"] for b in res["boundaries"]], bnd_col, "D", dx=-0.08 if res_b else 0.0)
    if res_b is not None:
        series(ax, xt, [lay["token"][k0] for lay in res_b["layers"]], tap_col, "o", hollow=True, dx=0.08, ls=":")
        series(ax, xb, [b["depth"] for b in res_b["boundaries"]], bnd_col, "D", hollow=True, dx=0.08)
    ax.set_ylabel("1 - cos  (0 straight, 1 right angle)")
    title = f"{res['pattern']}: token curvature per tap (o, stride {k0}) and depth curvature per boundary (◆)"
    ax.set_title(title + (f"\nfilled: A = {res['label']}   hollow: B = {res_b['label']}" if res_b else ""),
                 fontsize=9)
    top = ax.secondary_xaxis("top")
    top.set_xticks(xb, labels=[b["type"] for b in res["boundaries"]])
    top.tick_params(axis="x", labelrotation=90, labelsize=7, length=0)
    handles = [Line2D([], [], ls="", marker="s", color=_COLOURS[f], label=FAMILY_NAMES[f])
               for f in ["embed", *res["families"], "final"]]
    handles += [Line2D([], [], ls=":", marker="o", color="0.3", label="token curvature\n(at a tap)"),
                Line2D([], [], ls="-", marker="D", color="0.3", label="depth curvature\n(at a boundary;\ncolour: block after it)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    if comp is not None:
        ax2 = axes[1]
        decorate(ax2)
        ax2.axhline(0.0, color="0.4", lw=0.8)
        series(ax2, xt, [lay["token"][k0] for lay in comp["layers"]], tap_col, "o", diff=True, ls=":")
        series(ax2, xb, [b["depth"] for b in comp["boundaries"]], bnd_col, "D", diff=True)
        ax2.set_ylabel("A − B  (95% CI)")
        ax2.set_title(f"difference A − B ({'paired' if comp['paired'] else 'independent'} bootstrap); "
                      "filled = CI excludes 0", fontsize=9)
    axes[-1].set_xticks(xt, labels=[lay["tap"] for lay in res["layers"]])
    axes[-1].tick_params(axis="x", labelrotation=90, labelsize=7)
    axes[-1].set_xlim(-0.6, n - 0.4)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _dumps(obj: Any, level: int = 0) -> str:
    """JSON with lists of numbers kept on one line (per-sequence rows stay readable)."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        return "{\n" + ",\n".join(f"{pad}{json.dumps(str(k))}: {_dumps(v, level + 1)}" for k, v in obj.items()) \
            + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(json.dumps(v, allow_nan=False) for v in obj) + "]"
        return "[\n" + ",\n".join(pad + _dumps(v, level + 1) for v in obj) + "\n" + end + "]"
    return json.dumps(obj, allow_nan=False)


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``curvature.json``, ``curvature.md`` and ``curvature.png`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "curvature.json", "md": out / "curvature.md", "png": out / "curvature.png"}
    paths["json"].write_text(_dumps(dict(report)) + "\n")
    paths["md"].write_text(format_markdown(report))
    plot_report(report, paths["png"])
    return paths


# ----------------------------------------------------------------------------------------------
# amer curvature


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, exit 2, no usage dump
        raise _ArgError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amer curvature", description=(
        "Token and depth curvature of every tap, per block family and at every block boundary, with "
        "bootstrap CIs over held-out sequences. Writes curvature.json, curvature.md and curvature.png."))
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", metavar="PATH", help="checkpoint directory, or a run directory (its latest step)")
    src.add_argument("--pattern", metavar="P", help="a freshly initialised model (seeded): a preset name (its dims) "
                     "or a pattern string such as AEMR")
    src.add_argument("--preset", metavar="NAME", help="with a pattern string: take the dimensions from this preset")
    p.add_argument("--compare", metavar="PATH2", help="a second checkpoint of the same pattern, shown side by side "
                   "with the difference (first minus second) and its CI")
    p.add_argument("--data", help="'kjv', 'stdlib', a text/JSONL file or a directory (default: the checkpoint's "
                   "training data, else kjv); its validation split is measured")
    p.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the checkpoint's or preset's, else 256)")
    p.add_argument("--strides", default="1", help="token strides, comma-separated, e.g. '1,4' (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fresh model, the STP spans and the bootstrap")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--stp-spans", type=int, help="STP triples per sequence (default: the checkpoint's, else 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", metavar="DIR", help="output directory (default <run>/curvature, or curvature_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse_strides(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CurvatureError(f"--strides must be comma-separated integers >= 1 such as '1,4', got {text!r}") from None
    if not values:
        raise CurvatureError(f"--strides must name at least one stride, e.g. '1' or '1,4', got {text!r}")
    return _check_strides(values)


def _load_checkpoint(path: str, device: str) -> tuple[nn.Module, Any, dict[str, Any], Path]:
    from amer.checkpoint import find_checkpoint, load_checkpoint

    ckpt = find_checkpoint(path)
    model, cfg = load_checkpoint(ckpt, device=device)
    meta = json.loads((ckpt / "meta.json").read_text())
    return model, cfg, meta.get("config", {}), ckpt


def _stp_selected(stp: Mapping[str, Any] | None, pattern: Any) -> list[str]:
    from amer.tap import resolve_selector, tap_names

    if not stp or not stp.get("enabled") or not stp.get("layers"):
        return []
    names = tap_names(pattern)
    return [names[p] for p in resolve_selector(stp["layers"], pattern)]


def _build(args: argparse.Namespace) -> dict[str, Any]:
    """Everything up to the measurement: models, data, config; bad input raises a one-line error."""
    from amer.config import ConfigError, ModelConfig, to_dict
    from amer.data import ByteTokenizer, DataConfig, build_datasets
    from amer.model import HybridLM
    from amer.pattern import load_preset, preset_names

    if not args.checkpoint and not args.pattern:
        raise CurvatureError("give --checkpoint PATH (a trained run) or --pattern P (a fresh model: a preset name "
                             "such as tiny, or a pattern string such as AEMR)")
    if args.checkpoint and args.pattern:
        raise CurvatureError("give either --checkpoint or --pattern, not both (use --compare for a second model)")
    if args.preset and not args.pattern:
        raise CurvatureError("--preset only applies with --pattern (a checkpoint brings its own dimensions)")
    strides = _parse_strides(args.strides)
    for name in ("batches", "batch_size", "n_bootstrap"):
        if getattr(args, name) < 1:
            raise CurvatureError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stp_spans is not None and args.stp_spans < 1:
        raise CurvatureError(f"--stp-spans must be >= 1, got {args.stp_spans}")
    if args.seq_len is not None and args.seq_len < 3:
        raise CurvatureError(f"--seq-len must be >= 3 (a curvature needs three consecutive tokens), got {args.seq_len}")

    train_cfg: dict[str, Any] = {}
    if args.checkpoint:
        model, cfg, train_cfg, ckpt = _load_checkpoint(args.checkpoint, args.device)
        label, stp = str(ckpt), train_cfg.get("stp")
        default_out = ckpt.parent / "curvature"
    else:
        if args.pattern in preset_names():
            if args.preset:
                raise CurvatureError(f"--pattern {args.pattern} is already a preset; drop --preset")
            preset = load_preset(args.pattern)
            cfg = ModelConfig.from_preset(args.pattern)
            train_cfg, stp = dict(preset.get("train", {})), preset.get("stp")
        elif args.preset:
            cfg = ModelConfig.from_preset(args.preset, pattern=args.pattern)
            stp = None
        else:
            cfg, stp = ModelConfig(pattern=args.pattern), None
        torch.manual_seed(args.seed)
        model = HybridLM(cfg).to(args.device)
        label, ckpt = f"fresh {args.pattern} (seed {args.seed})", None
        default_out = Path("curvature_out")
    model_b = label_b = None
    if args.compare:
        model_b, cfg_b, _, ckpt_b = _load_checkpoint(args.compare, args.device)
        if cfg_b.parsed.letters.replace("|", "") != cfg.parsed.letters.replace("|", ""):
            raise CurvatureError(
                f"--compare {ckpt_b} has pattern {cfg_b.parsed.letters!r} but the first model has "
                f"{cfg.parsed.letters!r}; compare two checkpoints of one pattern (e.g. STP on vs off)")
        label_b = str(ckpt_b)

    seq_len = args.seq_len or int(train_cfg.get("seq_len") or 256)
    if seq_len < 2 * strides[-1] + 1:
        raise CurvatureError(f"--seq-len {seq_len} is too short for stride {strides[-1]}: needs >= {2 * strides[-1] + 1}")
    for m in (model, model_b):
        if m is not None and seq_len > m.cfg.max_seq_len:
            raise CurvatureError(f"--seq-len {seq_len} exceeds the model's max_seq_len {m.cfg.max_seq_len}")
        if m is not None and m.cfg.vocab_size < ByteTokenizer.vocab_size:
            raise CurvatureError(f"the model's vocab_size {m.cfg.vocab_size} is below the byte tokenizer's "
                                 f"{ByteTokenizer.vocab_size}")
    source = args.data or train_cfg.get("data") or "kjv"
    val_fraction = float(train_cfg.get("val_fraction") or 0.05)  # a run without validation: hold out 5% now
    data_seed = int(train_cfg.get("seed", 0))  # the run's seed fixes which documents it held out
    try:
        splits = build_datasets(DataConfig(source=str(source), seq_len=seq_len, val_fraction=val_fraction,
                                           seed=data_seed))
    except ConfigError as e:
        raise CurvatureError(str(e)) from None
    val = splits.val
    batches = list(val.val_batches(args.batch_size, args.batches))
    n_seq = sum(int(b["tokens"].shape[0]) for b in batches)
    if n_seq < 2:
        raise CurvatureError(f"data '{source}': the validation split holds {n_seq} sequence of {seq_len} tokens; "
                             f"bootstrap intervals need at least 2; lower --seq-len or add data")
    n_spans = args.stp_spans or int((train_cfg.get("stp") or stp or {}).get("n_spans") or 4)
    config = {
        "checkpoint": str(ckpt) if ckpt else None,
        "pattern_arg": args.pattern,
        "compare": label_b,
        "model": to_dict(cfg),
        "stp_selected": _stp_selected(stp, cfg.parsed),
        "data": str(source),
        "split": "validation",
        "val_fraction": val_fraction,
        "data_seed": data_seed,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "n_sequences": n_seq,
        "strides": strides,
        "seed": args.seed,
        "n_bootstrap": args.n_bootstrap,
        "stp_n_spans": n_spans,
        "device": str(args.device),
    }
    run = {"config": config, "model": model, "label": label, "model_b": model_b, "label_b": label_b,
           "batches": batches, "out": Path(args.out) if args.out else default_out}
    return run


def main(argv: list[str] | None = None) -> int:
    """``amer curvature``: measure, write the report, print the summary. Bad input: one line, exit 2."""
    from amer.checkpoint import CheckpointError
    from amer.config import ConfigError
    from amer.data import DataError
    from amer.pattern import PatternError
    from amer.tap import SelectorError

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ArgError as e:
        print(f"error: {e} (see amer curvature --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        run = _build(args)
        cfg = run["config"]
        kw = dict(strides=cfg["strides"], n_bootstrap=cfg["n_bootstrap"], seed=cfg["seed"],
                  stp_n_spans=cfg["stp_n_spans"], progress=not args.no_progress)
        result = evaluate(run["model"], run["batches"], **kw)
        result["label"] = run["label"]
        report: dict[str, Any] = {"config": cfg, "result": result}
        if run["model_b"] is not None:
            result_b = evaluate(run["model_b"], run["batches"], **kw)
            result_b["label"] = run["label_b"]
            report["result_b"] = result_b
            report["comparison"] = compare(result, result_b)
        paths = write_report(report, run["out"])
    except (CurvatureError, ConfigError, PatternError, DataError, CheckpointError, SelectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    print(format_summary(report))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
