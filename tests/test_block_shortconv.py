"""The gated short convolution (the C family, LFM2): the mixer against a plain convolution written here,
parity with transformers' ``Lfm2ShortConv``, initialisation, options.

Causality, gradient reach, prefill == decoding, split prefills, the meta build, compilation and packed
documents are checked for every family (C included) in test_mixer_contract.py and test_documents.py; the
option variant below runs those same clauses.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import test_documents as documents
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from mixer_checks import assert_decodes_like_transformers, assert_matches_reference
from torch import Tensor

from amer import ModelConfig
from amer.blocks import DocIds
from amer.blocks.shortconv import ShortConvCache, ShortConvMixer
from amer.config import ConfigError
from amer.families import Family

D = 32


def make_mixer(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> ShortConvMixer:
    cfg = ModelConfig(pattern="C", d_model=D, init_std=0.2, shortconv=kw)
    torch.manual_seed(seed)
    mixer = ShortConvMixer(cfg.shortconv, cfg.dims, cfg.parsed.layers[0]).to(dtype)
    with torch.no_grad():  # biases off their zero init, so a bias that is not read shows
        for p in (mixer.in_proj.bias, mixer.conv_bias, mixer.out_proj.bias):
            if p is not None:
                p.normal_(0.0, 0.3)
    return mixer


def reference(m: ShortConvMixer, x: Tensor, starts: list[int] | None = None) -> Tensor:
    """y_t = C_t * (bias + sum_k w_k (B x)_{t - K + 1 + k}), tap by tap; ``starts`` cut the window (one row)."""
    Bg, Cg, v = F.linear(x, m.in_proj.weight, m.in_proj.bias).chunk(3, dim=-1)
    bx = Bg * v
    K, T = m.l_cache, x.shape[1]
    first = [max(s for s in (starts or [0]) if s <= t) for t in range(T)]  # each step's document start
    y = torch.zeros_like(bx) + (0 if m.conv_bias is None else m.conv_bias)
    for t in range(T):
        for k in range(K):
            s = t - (K - 1) + k
            if s >= first[t]:
                y[:, t] = y[:, t] + m.conv_weight[:, k] * bx[:, s]
    return F.linear(Cg * y, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("options", [{}, {"bias": True, "l_cache": 4}, {"l_cache": 1}])
def test_mixer_matches_reference_fp64(options: dict[str, Any]) -> None:
    """Outputs and the gradients of the input and of every parameter."""
    mixer = make_mixer(dtype=torch.float64, **options)
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert_matches_reference(mixer(x).y, reference(mixer, x), [("x", x), *mixer.named_parameters()],
                             probe_seed=4, tol=1e-12, grad_rtol=1e-11, grad_atol=1e-11, live=True)


def test_documents_cut_the_window_fp64() -> None:
    mixer = make_mixer(dtype=torch.float64, l_cache=4)
    x = torch.randn(1, 12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    starts = [0, 2, 3, 9]
    ids = torch.zeros(1, 12, dtype=torch.long)
    for s in starts[1:]:
        ids[:, s:] += 1
    with torch.no_grad():
        packed = mixer(x, doc_ids=DocIds(ids)).y
        torch.testing.assert_close(packed, reference(mixer, x, starts), rtol=1e-12, atol=1e-12)
        assert (packed - reference(mixer, x)).abs().max() > 1e-3  # the control: the window does reach back


def test_gates_are_in_lfm2_order() -> None:
    """in_proj's three chunks are (B, C, x): zeroing the first chunk's rows silences the input to the
    convolution, and y = C * conv(B x) is bilinear in the gates."""
    mixer = make_mixer()
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        mixer.in_proj.weight[:D] = 0  # B = 0
        assert mixer(x).y.abs().max() == 0
        mixer.in_proj.weight[:D].normal_(0.0, 0.2)
        y1 = mixer(x).y
        mixer.in_proj.weight[D:2 * D] *= 2  # C doubled: y doubles
        torch.testing.assert_close(mixer(x).y, 2 * y1)


# ------------------------------------------------------------------------------------------------ transformers


def _hf_pair(bias: bool) -> tuple[Any, Any, ShortConvMixer]:
    transformers = pytest.importorskip("transformers")
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

    hfc = transformers.Lfm2Config(hidden_size=D, num_hidden_layers=1, layer_types=["conv"], conv_bias=bias,
                                  conv_L_cache=3, vocab_size=64, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2)
    torch.manual_seed(0)
    hf = Lfm2ShortConv(hfc, 0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15 if p.dim() > 1 and p.shape[-1] == D else 0.5)
    cfg = ModelConfig(pattern="C", d_model=D, shortconv={"l_cache": 3, "bias": bias})
    ours = ShortConvMixer(cfg.shortconv, cfg.dims, cfg.parsed.layers[0])
    state = {}
    for name, value in hf.state_dict().items():
        if name == "conv.weight":
            name, value = "conv_weight", value.squeeze(1)
        elif name == "conv.bias":
            name = "conv_bias"
        state[name] = value
    ours.load_state_dict(state, strict=True)
    return hf, hfc, ours


@pytest.mark.parametrize("bias", [False, True])
def test_parity_with_lfm2(bias: bool) -> None:
    """fp32, weights copied by the documented mapping: the full forward and token-by-token decoding agree
    to 1e-5; a perturbed weight (the control) does not."""
    hf, hfc, ours = _hf_pair(bias)
    x = torch.randn(2, 17, D, generator=torch.Generator().manual_seed(1))
    ref, theirs, _, _ = assert_decodes_like_transformers(hf, hfc, ours, x)
    with torch.no_grad():
        torch.testing.assert_close(theirs, ref, rtol=1e-5, atol=1e-5)
        ours.conv_weight[5, 1] += 0.5  # negative control
        assert (ours(x).y - ref).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ the block


def test_init() -> None:
    cfg = ModelConfig(pattern="CCCC", d_model=64, init_std=0.02)
    mixer = ShortConvMixer(cfg.shortconv, cfg.dims, cfg.parsed.layers[0])
    assert {n for n, _ in mixer.named_parameters()} == {"in_proj.weight", "conv_weight", "out_proj.weight"}
    assert mixer.in_proj.weight.shape == (192, 64) and mixer.conv_weight.shape == (64, 3)
    assert abs(mixer.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(mixer.out_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert mixer.conv_weight.abs().max() <= 1 / math.sqrt(3) and mixer.conv_weight.std() > 0.2
    biased = ShortConvMixer(ModelConfig(pattern="C", d_model=64, shortconv={"bias": True}).shortconv, cfg.dims,
                            cfg.parsed.layers[0])
    assert {n for n, p in biased.named_parameters() if n.endswith("bias")} == {"in_proj.bias", "conv_bias",
                                                                               "out_proj.bias"}
    assert all(torch.all(p == 0) for n, p in biased.named_parameters() if n.endswith("bias"))


def test_cache_and_flops() -> None:
    mixer = make_mixer(l_cache=4)
    cache = mixer.init_cache(3, 100, dtype=torch.bfloat16)
    assert isinstance(cache, ShortConvCache)
    assert cache.conv_state.shape == (3, 3, D) and cache.conv_state.dtype == torch.bfloat16
    assert mixer.flops(10) == {"proj": 10.0 * (3 * D * D + D * D), "conv": 10.0 * D * 4}


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="l_cache") as e:
        ModelConfig(pattern="C", d_model=D, shortconv={"l_cache": 0})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="bias"):
        ModelConfig(pattern="C", d_model=D, shortconv={"bias": "yes"})


def test_registered() -> None:
    assert Family("C").spec.mixer is ShortConvMixer and Family("C").spec.config_key == "shortconv"


@pytest.mark.parametrize("check", contract.CONTRACT + documents.DOCUMENT_CONTRACT, ids=lambda f: f.__name__)
def test_biased_variant_meets_the_contract(check: Any) -> None:
    check("C", bias=True, l_cache=4)
