"""Feed-forward activations of the E family's experts, each with its derivative for the hand-written backwards.

A gated feed-forward multiplies ``act(gate)`` by a second projection (GLU variants, Shazeer 2020, arXiv
2002.05202): ``silu`` (SwiGLU: Mixtral, Qwen-MoE, DeepSeek-V3, OLMoE) and ``gelu_tanh`` (GeGLU: Gemma). An
ungated one is ``down(act(up(x)))``: ``relu2`` (squared ReLU, So et al. 2021, arXiv 2109.08668; Nemotron-H's
experts) and ``gelu`` (the exact, erf-based GELU of Hendrycks and Gimpel 2016, arXiv 1606.08415; GPT-style
MLPs). ``grad(g, x)`` is ``g * act'(x)``, what the grouped and reference expert kernels need in backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "activation"]


class Activation(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    gated: bool  # act(gate) * up (two projections in) or act(up) (one)
    grad: Callable[[Tensor, Tensor], Tensor]  # (g, x) -> g * act'(x)


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


def _relu2_grad(g: Tensor, x: Tensor) -> Tensor:
    return g * (2.0 * F.relu(x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(F.silu, True, lambda g, x: torch.ops.aten.silu_backward(g, x)),
    "gelu_tanh": Activation(_gelu_tanh, True, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    "relu2": Activation(_relu2, False, _relu2_grad),
    "gelu": Activation(F.gelu, False, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
}


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown expert activation {name!r}; accepted: {', '.join(ACTIVATIONS)}") from None
