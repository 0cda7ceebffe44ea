"""The curvature engine: family-specific and block-boundary curvature of a model's hidden states, with the
checks a reader needs to trust it.

Two views of how hidden-state trajectories bend:

- **token curvature** of one tap: the bend between consecutive chords along the sequence (what STP,
  Semantic Tube Prediction, straightens), averaged per block family;
- **depth curvature** at every block boundary: for each token, the bend between the update written by one
  block and the update written by the next, labelled by the boundary type (``A->E``, ``E->M``...). The
  ends are included: the residual stream is taken to start at the origin, so ``embed->X`` compares the
  embedding vector with the first block's update, and ``X->final`` compares the last block's update with
  what the final norm does to the stream.

Every bend is given in two units: ``1 - cos`` in [0, 2] (0 straight, 1 a right angle or independent
directions, 2 a reversal; the STP loss) and the angle in degrees (the literature's unit). Around them:

- the normal/tangential decomposition of token bends (:mod:`amer.analysis.decomposition`);
- baselines on shuffled text, i.i.d. noise and a random walk (:mod:`amer.analysis.baselines`);
- contextual curvature against next-token entropy (:mod:`amer.analysis.entropy`);
- anisotropy checks: pairwise cosines, centred and whitened curvature (:mod:`amer.analysis.anisotropy`).

:func:`evaluate` runs a model over held-out batches and reduces the taps batch by batch to per-sequence
sums (memory does not grow with the number of batches beyond a few numbers per sequence, plus one ``D x D``
covariance per tap when the baselines or the anisotropy checks are on), then summarises with bootstrap
confidence intervals over sequences. Those checks need the data twice: a first pass estimates each tap's
mean and covariance, a second measures against them (and runs the model on shuffled text).
:func:`amer.analysis.compare.compare` puts two results side by side; :mod:`amer.report.curvature` renders
them and :mod:`amer.cli.curvature` is ``amer curvature``.

Statistics, stated once: a *mean* is pooled over every valid triple (token curvature, STP), token (depth
curvature) or pair (pairwise cosines) of every sequence, i.e. ``sum over sequences / count over
sequences``; *std* is the pooled standard deviation over those same items (the spread of single bends,
not an error bar); a correlation *r* is Pearson's over every counted position, pooled; the *95% CI* is
the percentile bootstrap of the pooled figure (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap"), resampling whole sequences with replacement (tokens of one sequence are correlated, so
resampling tokens would give intervals that are too narrow).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from amer.analysis.baselines import shuffle_within_documents
from amer.analysis.entropy import next_token_entropy, pearson
from amer.analysis.layout import Layout, Options
from amer.analysis.passes import Accumulators, TapTransform, first_pass, second_pass
from amer.analysis.sections import DEFINITIONS, sections
from amer.analysis.stats import CI_LEVEL, percentile_ci, ratio, resample_weights
from amer.errors import AnalysisError
from amer.tap import Tap

__all__ = ["FORMAT", "Options", "evaluate", "check_strides", "json_float"]

FORMAT = "amer-curvature/2"


def _full_taps(taps: Any) -> list[Tap]:
    if taps is None:
        raise AnalysisError("the model returned no taps; call it with taps=True (every block recorded)")
    taps = list(taps)
    kinds = [t.kind for t in taps]
    if len(taps) < 3 or kinds[0] != "embed" or kinds[-1] != "final" or any(
            k not in ("block", "branch", "layer") for k in kinds[1:-1]):
        raise AnalysisError(
            f"curvature needs the full tap recording [embed, every block, final], got {[t.name for t in taps]}")
    # the depth trajectory is the residual stream: a parallel layer's combined tap, never its branches'
    return [t for t in taps if t.kind != "branch"]


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


def _progress(batches: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return batches
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(batches, total=total, unit="batch", desc=desc, dynamic_ncols=True, disable=None, leave=False)


def _check_batch(batch: Mapping[str, Tensor], strides: list[int]) -> tuple[Tensor, Tensor, bool]:
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise AnalysisError(f"batch tokens must be (B, T), got shape {tuple(tokens.shape)}")
    T = tokens.shape[1]
    doc_ids = batch.get("doc_ids")
    has_docs = doc_ids is not None
    doc_ids = torch.zeros_like(tokens) if doc_ids is None else doc_ids
    if doc_ids.shape != tokens.shape:
        raise AnalysisError(f"doc_ids {tuple(doc_ids.shape)} must match tokens {tuple(tokens.shape)}")
    if T < 2 * strides[-1] + 1:
        raise AnalysisError(f"sequence length {T} is too short: token curvature at stride {strides[-1]} "
                            f"needs T >= {2 * strides[-1] + 1} (and T >= 3 at stride 1)")
    return tokens, doc_ids.long(), has_docs


def _check_options(strides: Sequence[int], n_bootstrap: int, stp_n_spans: int, opts: Options) -> list[int]:
    strides = check_strides(strides)
    if int(n_bootstrap) < 1:
        raise AnalysisError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if int(stp_n_spans) < 1:
        raise AnalysisError(f"stp_n_spans must be >= 1, got {stp_n_spans}")
    if int(opts.entropy_window) < 1:
        raise AnalysisError(f"entropy_window must be >= 1 bend, got {opts.entropy_window}")
    return strides


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
    options: Options | None = None,
) -> dict[str, Any]:
    """Token and depth curvature (both units), the decomposition, STP, baselines, entropy correlations and
    anisotropy checks of every tap, with 95% bootstrap CIs over sequences.

    Args:
        model: called as ``model(tokens, taps=True)`` (with ``doc_ids=`` when the batches carry them and
            ``documents`` is on); must return a :class:`~amer.model.ModelOutput` with ``logits`` and
            whose taps are the full recording ``[embed, every block, final]``. Run in eval mode under
            ``no_grad`` (its training flag is restored afterwards).
        batches: dicts with ``tokens`` (B, T) and optionally ``doc_ids`` (B, T) (documents keep
            token triples and STP spans inside one document; negative ids are padding), e.g.
            ``PackedDataset.val_batches(...)``. Read twice when the options need a second pass.
        strides: token strides ``k`` for triples ``(t, t+k, t+2k)``; a larger stride measures
            longer-range straightness.
        n_bootstrap: bootstrap replicates (resampling sequences) for the confidence intervals.
        seed: seeds the STP span sampler, the shuffles, the noise and the bootstrap; same seed and data,
            same numbers.
        stp_n_spans: STP triples sampled per sequence (the training loss's estimator, with a
            fixed generator so two models evaluated with one seed see the same spans).
        progress: a tqdm bar over batches (shown only on a terminal).
        documents: pass the batches' ``doc_ids`` to the model too, so no block sees across a packed
            document boundary and every trajectory starts at its own document's first token.
        options: which checks to run (:class:`~amer.analysis.layout.Options`: baselines, anisotropy,
            entropy and its window); all on by default.

    Returns:
        A JSON-serialisable dict whose schema (``format`` ``amer-curvature/2``) is documented in
        ``docs/curvature.md``: ``layers`` (per tap), ``boundaries``, ``boundary_types``, ``families``,
        run facts, ``definitions``, and ``per_sequence`` sums, counts and moments that
        :func:`amer.analysis.compare.compare` uses for paired bootstraps. Each mean-type statistic is
        ``{"key", "mean", "std", "ci": [lo, hi], "n"}``, each correlation ``{"key", "r", "ci", "n"}``.

    Raises:
        AnalysisError: bad strides, counts or batches, or a model without the full tap recording.
    """
    opts = options or Options()
    strides = _check_options(strides, n_bootstrap, stp_n_spans, opts)
    if opts.second_pass and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # read twice
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    lay: Layout | None = None
    acc = Accumulators() if opts.second_pass else None
    first: list[tuple[Tensor, Tensor, Tensor]] = []
    moments: list[Tensor] = []
    digest = hashlib.sha256()
    seq_lens: set[int] = set()
    n_tokens = 0

    def run(tokens: Tensor, doc_ids: Tensor, has_docs: bool) -> tuple[list[Tap], Tensor]:
        kw = {"doc_ids": doc_ids} if documents and has_docs else {}
        out = model(tokens, taps=True, **kw)
        return _full_taps(out.taps), out.logits

    try:
        for batch in _progress(batches, progress, "curvature"):
            tokens, doc_ids, has_docs = _check_batch(batch, strides)
            digest.update(np.ascontiguousarray(tokens.cpu().long().numpy()).tobytes())
            digest.update(np.ascontiguousarray(doc_ids.cpu().numpy()).tobytes())
            tokens, doc_ids = tokens.to(device), doc_ids.to(device)
            taps, logits = run(tokens, doc_ids, has_docs)
            if lay is None:
                lay = Layout.from_taps(taps, strides, opts)
                # spans drawn on the host whatever the device: the same spans on every device (and no host
                # read inside an XLA graph); the draw travels as a small input
                gen = torch.Generator().manual_seed(int(seed))
            elif [t.name for t in taps] != lay.names:
                raise AnalysisError("the model's taps changed between batches")
            entropy = next_token_entropy(logits) if opts.entropy else None
            del logits
            sums = first_pass(taps, doc_ids, entropy, lay, int(stp_n_spans), gen, acc)
            del taps
            first.append(sums.stacked(lay.first))
            if opts.entropy:
                moments.append(sums.stacked_moments(lay.corr))
            seq_lens.add(int(tokens.shape[1]))
            n_tokens += int((doc_ids >= 0).sum())
        if lay is None:
            raise AnalysisError("no batches to evaluate: the data yielded no sequences")
        second: list[tuple[Tensor, Tensor, Tensor]] = []
        ranks: dict[str, int] = {}
        if opts.second_pass:
            transforms = {n: TapTransform.build(acc, n, strides) for n in lay.names}
            ranks = {n: t.rank for n, t in transforms.items()}
            gen2 = torch.Generator().manual_seed(int(seed) + 1)
            for batch in _progress(batches, progress, "baselines"):
                tokens, doc_ids, has_docs = _check_batch(batch, strides)
                tokens, doc_ids = tokens.to(device), doc_ids.to(device)
                taps, _ = run(tokens, doc_ids, has_docs)
                shuffled = None
                if opts.baselines:
                    mixed = shuffle_within_documents(tokens.cpu(), doc_ids.cpu(), gen2).to(device)
                    shuffled, _ = run(mixed, doc_ids, has_docs)
                second.append(second_pass(taps, shuffled, doc_ids, lay, transforms, gen2).stacked(lay.second))
                del taps, shuffled
    finally:
        model.train(was_training)

    def cat(parts: list[tuple[Tensor, Tensor, Tensor]], i: int, width: int) -> np.ndarray:
        return torch.cat([p[i] for p in parts]).numpy() if parts else np.zeros((n_seq, width))

    n_seq = sum(int(p[0].shape[0]) for p in first)
    S, Q, C = (lay.expand(np.concatenate([cat(first, i, len(lay.first)), cat(second, i, len(lay.second))], axis=1))
               for i in range(3))
    keys = lay.all_keys()
    total_s, total_q, total_c = S.sum(0), Q.sum(0), C.sum(0)
    mean = ratio(total_s, total_c)
    std = np.sqrt(np.maximum(ratio(total_q, total_c) - mean**2, 0.0))
    W = resample_weights(n_seq, int(n_bootstrap), int(seed))
    ci = percentile_ci(ratio(W @ S, W @ C))
    stats: dict[str, dict[str, Any]] = {
        k: {"key": k, "mean": json_float(mean[i]), "std": json_float(std[i]),
            "ci": [json_float(ci[0, i]), json_float(ci[1, i])], "n": int(round(total_c[i]))}
        for i, k in enumerate(keys)}
    per_sequence: dict[str, Any] = {"keys": keys, "sum": S.tolist(), "count": C.tolist()}
    if opts.entropy:
        M = lay.expand_corr(torch.cat(moments).numpy())  # (N, K, 6)
        r = pearson(M.sum(0))
        boot = pearson(np.einsum("rn,nkj->rkj", W, M))
        rci = percentile_ci(boot)
        for i, k in enumerate(lay.all_corr_keys()):
            stats[k] = {"key": k, "r": json_float(r[i]), "ci": [json_float(rci[0, i]), json_float(rci[1, i])],
                        "n": int(round(M[:, i, 0].sum()))}
        per_sequence["corr_keys"] = lay.all_corr_keys()
        per_sequence["moments"] = M.tolist()
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
        "options": {"baselines": opts.baselines, "anisotropy": opts.anisotropy, "entropy": opts.entropy,
                    "entropy_window": int(opts.entropy_window)},
        "definitions": DEFINITIONS | {"ci": f"{CI_LEVEL:.0%} percentile bootstrap, resampling whole sequences "
                                            f"({n_bootstrap} replicates)",
                                      "stp": f"the STP loss (1 - cos over {stp_n_spans} sampled triples per "
                                             f"sequence, fixed generator)"},
        **sections(lay, stats, ranks),
        "next_token_entropy": stats.get("entropy"),
        "per_sequence": per_sequence,
    }
