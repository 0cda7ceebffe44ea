"""Checks the per-family block tests share: a mixer against its written-out reference (outputs and gradients), and a
small model with the family's blocks training while its taps select them."""

from __future__ import annotations

from collections.abc import Sequence

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
