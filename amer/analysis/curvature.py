"""The curvature engine: family-specific and block-boundary curvature of a model's hidden states.

Two views of how hidden-state trajectories bend:

- **token curvature** of one tap: ``1 - cos`` between consecutive chords along the sequence
  (what STP, Semantic Tube Prediction, straightens), averaged per block family;
- **depth curvature** at every block boundary: for each token, ``1 - cos`` between the update
  written by one block and the update written by the next, labelled by the boundary type
  (``A->E``, ``E->M``...). The ends are included: the residual stream is taken to start at the
  origin, so ``embed->X`` compares the embedding vector with the first block's update, and
  ``X->final`` compares the last block's update with what the final norm does to the stream.

Both are ``1 - cos`` in [0, 2]: 0 straight, 1 a right angle (or independent directions), 2 a
reversal.

:func:`evaluate` runs a model over held-out batches and reduces the taps batch by batch to
per-sequence sums (memory does not grow with the number of batches beyond a few numbers per
sequence), then summarises with bootstrap confidence intervals over sequences.
:func:`amer.analysis.compare.compare` puts two results side by side; :mod:`amer.report.curvature`
renders them and :mod:`amer.cli.curvature` is ``amer curvature``.

Statistics, stated once: a *mean* is pooled over every valid triple (token curvature, STP) or
token (depth curvature) of every sequence, i.e. ``sum over sequences / count over sequences``;
*std* is the pooled standard deviation over those same triples/tokens (the spread of individual
bends, not an error bar); the *95% CI* is the percentile bootstrap of the pooled mean (Efron &
Tibshirani 1993, "An Introduction to the Bootstrap"), resampling whole sequences with replacement
(tokens of one sequence are correlated, so resampling tokens would give intervals that are too
narrow).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from amer.analysis.metrics import depth_states
from amer.analysis.stats import CI_LEVEL, percentile_ci, ratio, resample_weights
from amer.analysis.trajectory import depth_curvature_per_token, token_curvature
from amer.errors import AnalysisError
from amer.families import get_family, letters
from amer.stp.triple import sample_spans, span_bends
from amer.tap import Tap

__all__ = ["FORMAT", "evaluate", "check_strides", "json_float"]

FORMAT = "amer-curvature/1"


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
    def from_taps(cls, taps: Sequence[Tap], strides: list[int]) -> _Layout:
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
            is_fam = [kind == "block" and lab == fam for kind, lab in zip(lay.kinds, lay.labels)]
            members = [n for n, member in zip(lay.names, is_fam) if member]
            for k in strides:
                lay.groups.append((f"fam/{fam}/tok/s{k}", [col[f"tok/{n}/s{k}"] for n in members]))
            lay.groups.append((f"fam/{fam}/stp", [col[f"stp/{n}"] for n in members]))
            # a boundary "into" F is the bend where an F block's update follows its predecessor's
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
        """The block families present, in registry order (so every report lists them alike)."""
        present = {lab for lab, kind in zip(self.labels, self.kinds) if kind == "block"}
        return [f for f in letters() if f in present]

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
        raise AnalysisError("the model returned no taps; call it with taps=True (every block recorded)")
    taps = list(taps)
    kinds = [t.kind for t in taps]
    if len(taps) < 3 or kinds[0] != "embed" or kinds[-1] != "final" or any(k != "block" for k in kinds[1:-1]):
        raise AnalysisError(
            f"curvature needs the full tap recording [embed, every block, final], got {[t.name for t in taps]}")
    return taps


def check_strides(strides: Iterable[int]) -> list[int]:
    """``strides`` as a sorted list of distinct integers >= 1; anything else is an :class:`AnalysisError`."""
    out = [int(s) for s in strides]
    if not out:
        raise AnalysisError("strides must name at least one stride, e.g. (1,) or (1, 4)")
    if any(s < 1 for s in out) or len(set(out)) != len(out):
        raise AnalysisError(f"strides must be distinct integers >= 1, got {out}")
    return sorted(out)


def json_float(x: float) -> float | None:
    """``x`` as a JSON number, or None where it is NaN/infinite (a statistic with no observations)."""
    x = float(x)
    return x if math.isfinite(x) else None


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
    for tap in taps:
        add(span_bends(tap.hidden, idx), weight)
    states, _ = depth_states(taps)
    per_token = depth_curvature_per_token(states)  # (n_boundaries, B, T)
    valid = (doc_ids >= 0).float()  # each token is its own depth trajectory: only padding is dropped
    for j in range(per_token.shape[0]):
        add(per_token[j], valid)
    return torch.stack(sums, 1).cpu(), torch.stack(sqs, 1).cpu(), torch.stack(cnts, 1).cpu()


def _progress(batches: Iterable[Any], progress: bool) -> Iterable[Any]:
    if not progress:
        return batches
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(batches, total=total, unit="batch", desc="curvature", dynamic_ncols=True, disable=None, leave=False)


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
    documents: bool = True,
) -> dict[str, Any]:
    """Token curvature, depth curvature and STP loss of every tap, with 95% bootstrap CIs over sequences.

    Args:
        model: called as ``model(tokens, taps=True)`` (with ``doc_ids=`` when the batches carry them and
            ``documents`` is on); must return a :class:`~amer.model.ModelOutput`
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
        documents: pass the batches' ``doc_ids`` to the model too, so no block sees across a packed
            document boundary and every trajectory starts at its own document's first token.

    Returns:
        A JSON-serialisable dict: ``layers`` (per tap: ``token`` per stride, ``stp``),
        ``boundaries`` (per boundary: ``depth``, with ``type`` such as ``A->E``),
        ``boundary_types``, ``families`` (per family: ``token``, ``stp``, ``depth_in``,
        ``depth_out``), run facts, and ``per_sequence`` sums/counts that
        :func:`amer.analysis.compare.compare` uses for paired bootstraps. Each statistic is
        ``{"key", "mean", "std", "ci": [lo, hi], "n"}`` (see the module docstring for what mean,
        std and CI are).

    Raises:
        AnalysisError: bad strides, counts or batches, or a model without the full tap recording.
    """
    strides = check_strides(strides)
    if int(n_bootstrap) < 1:
        raise AnalysisError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if int(stp_n_spans) < 1:
        raise AnalysisError(f"stp_n_spans must be >= 1, got {stp_n_spans}")
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
                raise AnalysisError(f"batch tokens must be (B, T), got shape {tuple(tokens.shape)}")
            T = tokens.shape[1]
            doc_ids = batch.get("doc_ids")
            doc_ids = torch.zeros_like(tokens) if doc_ids is None else doc_ids
            if doc_ids.shape != tokens.shape:
                raise AnalysisError(f"doc_ids {tuple(doc_ids.shape)} must match tokens {tuple(tokens.shape)}")
            if T < 2 * strides[-1] + 1:
                raise AnalysisError(f"sequence length {T} is too short: token curvature at stride {strides[-1]} "
                                    f"needs T >= {2 * strides[-1] + 1} (and T >= 3 at stride 1)")
            digest.update(np.ascontiguousarray(tokens.cpu().long().numpy()).tobytes())
            digest.update(np.ascontiguousarray(doc_ids.cpu().long().numpy()).tobytes())
            tokens, doc_ids = tokens.to(device), doc_ids.to(device).long()
            kw = {"doc_ids": doc_ids} if documents and batch.get("doc_ids") is not None else {}
            taps = _full_taps(model(tokens, taps=True, **kw).taps)
            if lay is None:
                lay = _Layout.from_taps(taps, strides)
                # spans drawn on the host whatever the device: the same spans on every device (and no host
                # read inside an XLA graph); the draw travels as a small input
                gen = torch.Generator().manual_seed(int(seed))
            elif [t.name for t in taps] != lay.names:
                raise AnalysisError("the model's taps changed between batches")
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
        raise AnalysisError("no batches to evaluate: the data yielded no sequences")

    S = lay.expand(torch.cat(sums).numpy())  # (N, K) per-sequence sums
    Q = lay.expand(torch.cat(sqs).numpy())
    C = lay.expand(torch.cat(cnts).numpy())
    keys = lay.all_keys()
    n_seq = S.shape[0]
    total_s, total_q, total_c = S.sum(0), Q.sum(0), C.sum(0)
    mean = ratio(total_s, total_c)
    std = np.sqrt(np.maximum(ratio(total_q, total_c) - mean**2, 0.0))
    W = resample_weights(n_seq, int(n_bootstrap), int(seed))
    ci = percentile_ci(ratio(W @ S, W @ C))
    stats = {k: {"key": k, "mean": json_float(mean[i]), "std": json_float(std[i]),
                 "ci": [json_float(ci[0, i]), json_float(ci[1, i])], "n": int(round(total_c[i]))}
             for i, k in enumerate(keys)}
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
            "mean": "pooled over every valid triple (token curvature, STP) or token (depth curvature) "
                    "of every sequence",
            "std": "pooled standard deviation over the same triples / tokens (spread of single bends, "
                   "not an error bar)",
            "ci": f"{CI_LEVEL:.0%} percentile bootstrap of the mean, resampling whole sequences "
                  f"({n_bootstrap} replicates)",
            "token": "1 - cos(h[t+k] - h[t], h[t+2k] - h[t+k]) over consecutive triples inside one document, stride k",
            "depth": "1 - cos(update of one block, update of the next) per token; embed->X uses the embedding "
                     "itself as the first update, X->final the final norm's change",
            "stp": f"the STP loss (1 - cos over {stp_n_spans} sampled triples per sequence, fixed generator)",
        },
        **_sections(lay, stats),
        "per_sequence": {"keys": keys, "sum": S.tolist(), "count": C.tolist()},
    }


def _sections(lay: _Layout, stats: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``layers``, ``boundaries``, ``boundary_types`` and ``families`` sections of a result."""
    layers = [{"tap": n, "kind": kind, "family": lab if kind == "block" else None, "layer": layer, "index": index,
               "token": {str(k): stats[f"tok/{n}/s{k}"] for k in lay.strides}, "stp": stats[f"stp/{n}"]}
              for n, kind, lab, layer, index in zip(lay.names, lay.kinds, lay.labels, lay.layers, lay.indices)]
    boundaries = [{"position": j, "name": b, "type": ty, "from": lay.names[j], "to": lay.names[j + 1],
                   "depth": stats[f"depth/{b}"]}
                  for j, (b, ty) in enumerate(zip(lay.boundary_names, lay.boundary_types))]
    types: dict[str, dict[str, Any]] = {}
    for b in boundaries:
        types.setdefault(b["type"], {"n_boundaries": 0, "positions": [], "depth": stats[f"depth_type/{b['type']}"]})
        types[b["type"]]["n_boundaries"] += 1
        types[b["type"]]["positions"].append(b["position"])
    families = {
        fam: {
            "name": get_family(fam).name,
            "blocks": [n for n, lab, kind in zip(lay.names, lay.labels, lay.kinds) if kind == "block" and lab == fam],
            "token": {str(k): stats[f"fam/{fam}/tok/s{k}"] for k in lay.strides},
            "stp": stats[f"fam/{fam}/stp"],
            "depth_in": stats[f"fam/{fam}/depth_in"],
            "depth_out": stats[f"fam/{fam}/depth_out"],
        }
        for fam in lay.families
    }
    return {"layers": layers, "boundaries": boundaries, "boundary_types": types, "families": families}
