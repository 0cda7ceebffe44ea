"""Checks the per-family block tests share: a mixer against its written-out reference (outputs and gradients) and
against a transformers layer (full forward and decoding), and a small model with the family's blocks training while
its taps select them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from torch import Tensor

from amer import HybridLM, ModelConfig


def assert_matches_reference(y: Tensor, y_ref: Tensor, named: Sequence[tuple[str, Tensor]], *, probe_seed: int,
                             tol: float, grad_rtol: float, grad_atol: float, live: bool = False) -> None:
    """``y`` equals ``y_ref`` and so does the gradient of ``sum(y * probe)`` with respect to each named tensor; a
    random probe rather than a plain sum, so that a wrong mixing of positions or channels cannot cancel out.
    ``live``: every gradient must also be non-zero (a tensor the function ignores would match trivially)."""
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=y.dtype)
    tensors = [t for _, t in named]
    grads = torch.autograd.grad((y * probe).sum(), tensors)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), tensors)
    for (name, _), got, want in zip(named, grads, grads_ref, strict=True):
        if live:
            assert got.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got, want, rtol=grad_rtol, atol=grad_atol,
                                   msg=lambda msg, name=name: f"grad wrt {name}: {msg}")


def check_trains_with_taps(cfg: ModelConfig, letter: str) -> None:
    """``cfg``'s pattern has the ``letter`` block last at layer 3: ``<letter>-1`` selects its tap, and a few AdamW
    steps on CE (plus the aux losses) lower the loss with every gradient finite and non-zero."""
    from amer.config import TrainConfig
    from amer.training.optim import make_optimizer

    torch.manual_seed(0)
    model = HybridLM(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    losses = []
    for _ in range(4):
        out = model(tokens)
        (tap,) = out.taps.select(f"{letter}-1")
        assert (tap.layer, tap.family) == (3, letter)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        (ce + sum(out.aux_losses.values())).backward()
        contract.assert_live_grads(model.named_parameters(), cfg.pattern)
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < losses[0]


def _hf_call(hf: Any, x: Tensor, cache: Any = None) -> Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # transformers' notes on its slow paths and cache classes
        return hf(x, cache=cache)


def assert_decodes_like_transformers(hf: Any, hfc: Any, ours: Any, x: Tensor) -> tuple[Tensor, Tensor, Any, Any]:
    """fp32, 1e-5: ``ours`` equals the transformers layer ``hf`` (config ``hfc``, called as ``hf(x, cache=...)``) on
    the full forward and token by token from empty caches. Returns the full forward, the steps and both caches, for
    the caller's state checks and its negative control."""
    from transformers import DynamicCache

    ref = _hf_call(hf, x)
    assert 0.1 < ref.abs().max() < 100  # neither vanishing nor blown up, so 1e-5 means something
    with torch.no_grad():
        torch.testing.assert_close(ours(x).y, ref, rtol=1e-5, atol=1e-5)
        hf_cache, hf_steps = DynamicCache(config=hfc), []
        cache, steps = ours.init_cache(x.shape[0], x.shape[1]), []
        for t in range(x.shape[1]):
            hf_steps.append(_hf_call(hf, x[:, t:t + 1], hf_cache))
            out = ours(x[:, t:t + 1], cache=cache)
            cache = out.cache
            steps.append(out.y)
        theirs = torch.cat(hf_steps, 1)
        torch.testing.assert_close(torch.cat(steps, 1), theirs, rtol=1e-5, atol=1e-5)
    return ref, theirs, cache, hf_cache
