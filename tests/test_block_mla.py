"""Multi-head latent attention (the D family): the mixer against a plain re-derivation of its maths in fp64 (the
training path and the absorbed decoding path, outputs and gradients), the decoding cache holding the latent and
nothing else, YaRN's frequencies against transformers', and parity with transformers' ``DeepseekV3Attention``
(interleaved and half-split rotary layouts, YaRN) and ``KimiLinearAttention`` with the weights mapped by
:mod:`amer.interop.mla`, forward and token by token.

Causality, gradient reach, prefill == decoding, split prefills, packed documents, meta build and compilation
of the D block run for every family in test_mixer_contract.py / test_documents.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from mixer_checks import assert_matches_reference, check_trains_with_taps
from torch import Tensor

from amer import ModelConfig
from amer.blocks.mla import MLACache, MLAMixer
from amer.errors import ConfigError
from amer.interop.mla import mla_options, mla_weights
from amer.interop.source import Source
from amer.ops.rope import yarn_inv_freq, yarn_mscale

D = 32
SMALL = contract.SMALL["D"]


def make_mixer(seed: int = 0, **options: Any) -> MLAMixer:
    cfg = ModelConfig(pattern="DD", d_model=D, max_seq_len=64, init_std=0.2, mla={**SMALL, **options})
    torch.manual_seed(seed)
    m = MLAMixer(cfg.mla, cfg.dims, cfg.parsed.layers[0])
    with torch.no_grad():  # norm gains and biases away from 1 / 0, so a misplaced one shows
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


def rotate(x: Tensor, pos: Tensor, inv_freq: Tensor, factor: float) -> Tensor:
    """Dim i and dim i + half of each head turned by the angle pos * inv_freq[i], the result times ``factor``."""
    half = x.shape[-1] // 2
    ang = pos[:, None].to(x.dtype) * inv_freq.to(x.dtype)[None, :]  # (T, half)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1) * factor


def rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * w


def reference(m: MLAMixer, x: Tensor) -> Tensor:
    """Decompress every head's keys and values, attend causally over an explicit score matrix, project out."""
    c, B, T = m.cfg, x.shape[0], x.shape[1]
    H, nope, rot, vd, R = m.H, m.nope, m.rot, m.vd, m.R
    eps = m.kv_a_norm.eps
    if c.q_lora_rank:
        q = F.linear(rms(F.linear(x, m.q_a_proj.weight, m.q_a_proj.bias), m.q_a_norm.weight, eps), m.q_b_proj.weight)
    else:
        q = F.linear(x, m.q_proj.weight)
    q = q.view(B, T, H, nope + rot)
    ckv = F.linear(x, m.kv_a_proj.weight, m.kv_a_proj.bias)
    lat, k_pe = rms(ckv[..., :R], m.kv_a_norm.weight, eps), ckv[..., R:]
    kv = F.linear(lat, m.kv_b_proj.weight).view(B, T, H, nope + vd)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    if c.rope:
        pos = torch.arange(T)
        q_pe = torch.stack([rotate(q_pe[:, :, h], pos, m.inv_freq, m.rope_factor) for h in range(H)], 2)
        k_pe = rotate(k_pe, pos, m.inv_freq, m.rope_factor)
    out = torch.empty(B, T, H, vd, dtype=x.dtype)
    for h in range(H):
        qh = torch.cat([q_nope[:, :, h], q_pe[:, :, h]], -1)
        kh = torch.cat([kv[:, :, h, :nope], k_pe], -1)
        s = torch.einsum("btd,bsd->bts", qh, kh) * m.scale
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = torch.einsum("bts,bsd->btd", s.softmax(-1), kv[:, :, h, nope:])
    return F.linear(out.reshape(B, T, H * vd), m.out_proj.weight, m.out_proj.bias)


VARIANTS = [
    {},  # query LoRA, RoPE
    {"q_lora_rank": 0, "bias": True, "rope": False},  # one query projection, biases, no position (Kimi Linear)
    {"yarn_factor": 4.0, "yarn_original": 8, "yarn_mscale": 0.8, "yarn_mscale_all_dim": 1.0},  # YaRN, T > original
]


def _ids(o: dict[str, Any]) -> str:
    return ",".join(o) or "default"


@pytest.mark.parametrize("options", VARIANTS, ids=_ids)
def test_mixer_matches_reference_fp64(options: dict[str, Any]) -> None:
    """Training path: outputs and every parameter's gradient equal the written-out maths."""
    m = make_mixer(**options).double()
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, y_ref = m(x).y, reference(m, x)
    assert_matches_reference(y, y_ref, list(m.named_parameters()), probe_seed=2, tol=1e-10, grad_rtol=1e-8,
                             grad_atol=1e-10)


@pytest.mark.parametrize("options", VARIANTS, ids=_ids)
def test_absorbed_decoding_matches_reference_fp64(options: dict[str, Any]) -> None:
    """Decoding (kv_b absorbed into query and output, attention over the cached latents): a prefill of 5 and then
    one token at a time equal the written-out maths; negative control: a cache that forgets the prefill does not."""
    m = make_mixer(**options).double()
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        want = reference(m, x)
        cache = m.init_cache(2, 21, dtype=torch.float64)
        out = m(x[:, :5], cache=cache)
        ys, cache = [out.y], out.cache
        for t in range(5, 21):
            out = m(x[:, t:t + 1], cache=cache)
            ys.append(out.y)
            cache = out.cache
        torch.testing.assert_close(torch.cat(ys, 1), want, rtol=1e-10, atol=1e-10)
        forgot = m(x[:, 5:], cache=MLACache(torch.zeros_like(cache.latent), 5)).y
        assert (forgot - want[:, 5:]).abs().max() > 1e-3


def test_the_cache_is_the_latent() -> None:
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim numbers (an A block of the same heads
    holds 2 H hd): the normed latent and the rotated shared key part, nothing per head."""
    m = make_mixer()
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
    cache = m.init_cache(2, 16)
    assert cache.latent.shape == (2, 16, m.R + m.rot) and m.R + m.rot < 2 * m.H * m.qk
    with torch.no_grad():
        cache = m(x, cache=cache).cache
        c = m.kv_a_norm(m.kv_a_proj(x)[..., :m.R])
    assert cache.pos == 9
    torch.testing.assert_close(cache.latent[:, :9, :m.R], c)
    assert torch.equal(cache.latent[:, 9:], torch.zeros(2, 7, m.R + m.rot))


def test_yarn_frequencies_and_scale_match_transformers() -> None:
    tf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hc = tf.DeepseekV3Config(rope_parameters=dict(params), max_position_embeddings=163840)
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hc, "cpu")
    ours = yarn_inv_freq(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    torch.testing.assert_close(ours, inv, rtol=0, atol=0)
    assert factor == pytest.approx(1.0)
    m = make_mixer(qk_nope_head_dim=128, qk_rope_head_dim=64, yarn_factor=40.0, yarn_original=4096,
                   yarn_mscale_all_dim=1.0)
    assert m.scale == pytest.approx(yarn_apply_mscale(params, 192 ** -0.5), rel=1e-12)
    assert m.scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2) and yarn_mscale(1.0) == 1.0


@pytest.mark.parametrize("options,message", [
    ({"qk_rope_head_dim": 7}, "mla.qk_rope_head_dim must be even"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"yarn_factor": -2.0}, "yarn_factor"),
])
def test_bad_settings_are_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(pattern="D", d_model=32, mla=options)


# ------------------------------------------------------------------------------------------------
# parity with transformers' layers, weights mapped by amer.interop.mla from a saved folder

HF_T, HF_PREFILL = 19, 5
MLA_HF = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, vocab_size=64, num_hidden_layers=1,
              intermediate_size=48, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "mscale": 0.9, "mscale_all_dim": 1.0}
CASES = {
    "deepseek_v3_interleaved": ("DeepseekV3ForCausalLM", dict(rope_interleave=True)),
    "deepseek_v3_halves_bias": ("DeepseekV3ForCausalLM", dict(rope_interleave=False, attention_bias=True)),
    "deepseek_v3_yarn_no_q_lora": ("DeepseekV3ForCausalLM", dict(rope_interleave=True, q_lora_rank=None,
                                                                 rope_parameters=YARN, max_position_embeddings=32)),
    "kimi_linear": ("KimiLinearForCausalLM", dict(linear_attn_config={"head_dim": 8, "num_heads": 4,
                                                                      "short_conv_kernel_size": 4, "kda_layers": [2],
                                                                      "full_attn_layers": [1]})),
}


def _save_layer(path: Path, arch: str, hc: Any, layer: torch.nn.Module) -> Source:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({f"model.layers.0.self_attn.{k}": v.contiguous() for k, v in layer.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**hc.to_dict(), "architectures": [arch]}))
    return Source(path)


def hf_pair(case: str, tmp_path: Path) -> tuple[Any, Any, MLAMixer, Any]:
    """(transformers layer, its config, the amer mixer built from the saved layer, rotary embedding or None)."""
    tf = pytest.importorskip("transformers")
    arch, extra = CASES[case]
    if arch == "DeepseekV3ForCausalLM":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
        hc = tf.DeepseekV3Config(**{**MLA_HF, **extra})
        layer, rope = DeepseekV3Attention(hc, 0), DeepseekV3RotaryEmbedding(hc)
    else:
        from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearAttention
        hc = tf.KimiLinearConfig(**{**MLA_HF, "num_hidden_layers": 2, "pad_token_id": 0, "bos_token_id": 1,
                                    "eos_token_id": 2, **extra})
        layer, rope = KimiLinearAttention(hc, 0), None
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    layer.eval()
    src = _save_layer(tmp_path / case, arch, hc, layer)
    state: dict[str, Tensor] = {}
    options = mla_options(src, rope=arch != "KimiLinearForCausalLM")
    mla_weights(src, "model.layers.0.self_attn.", 0, state, interleaved=bool(getattr(hc, "rope_interleave", False)))
    src.check_all_used()
    cfg = ModelConfig(pattern="D", d_model=D, max_seq_len=64, mla=options)
    m = MLAMixer(cfg.mla, cfg.dims, cfg.parsed.layers[0]).eval()
    m.load_state_dict({k.removeprefix("blocks.0.mixer."): v for k, v in state.items()}, strict=True)
    return layer, hc, m, rope


def _hf_call(layer: Any, rope: Any, x: Tensor, start: int, cache: Any = None) -> Tensor:
    T = x.shape[1]
    end = start + T
    mask = torch.zeros(1, 1, T, end).masked_fill(
        torch.arange(end)[None, :] > torch.arange(start, end)[:, None], float("-inf"))
    kw: dict[str, Any] = {"attention_mask": mask, "cache": cache}
    if rope is not None:
        kw["position_embeddings"] = rope(x, torch.arange(start, end)[None])
    return layer(x, **kw)[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_parity(case: str, tmp_path: Path) -> None:
    """The full forward, and a prefill then token-by-token decoding through each side's own cache (transformers'
    caches the latent too), equal the transformers layer (fp32, 1e-5)."""
    from transformers import DynamicCache

    layer, hc, m, rope = hf_pair(case, tmp_path)
    x = torch.randn(2, HF_T, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _hf_call(layer, rope, x, 0)
        fwd = (m(x).y - want).abs().max().item()
        hf_cache, cache = DynamicCache(config=hc), m.init_cache(2, HF_T)
        theirs, ours = [], []
        for s, e in [(0, HF_PREFILL), *((t, t + 1) for t in range(HF_PREFILL, HF_T))]:
            theirs.append(_hf_call(layer, rope, x[:, s:e], s, hf_cache))
            out = m(x[:, s:e], cache=cache)
            ours.append(out.y)
            cache = out.cache
        dec = (torch.cat(ours, 1) - torch.cat(theirs, 1)).abs().max().item()
    print(f"{case}: forward {fwd:.2e} decode {dec:.2e}")
    assert fwd <= 1e-5 and dec <= 1e-5, (fwd, dec)
    torch.testing.assert_close(torch.cat(theirs, 1), want, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", ["deepseek_v3_interleaved", "deepseek_v3_yarn_no_q_lora"])
def test_transformers_parity_negative_controls(case: str, tmp_path: Path) -> None:
    """The mapping is what makes parity: the interleaved rows left unpermuted, or YaRN's softmax correction left
    out, is seen far above the tolerance."""
    layer, hc, m, rope = hf_pair(case, tmp_path)
    x = torch.randn(2, HF_T, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _hf_call(layer, rope, x, 0)
        assert (m(x).y - want).abs().max() <= 1e-5
        if case == "deepseek_v3_interleaved":
            m.kv_a_proj.weight.copy_(layer.kv_a_proj_with_mqa.weight)  # interleaved rows as they are stored
        else:
            m.scale = m.qk ** -0.5
        assert (m(x).y - want).abs().max() > 1e-3


def test_model_with_d_blocks_selects_taps_and_trains() -> None:
    """ADEDE: D-1 selects the last D block's tap, and a few AdamW steps on CE lower the loss with every gradient
    live."""
    cfg = ModelConfig(pattern="ADEDE", d_model=32, vocab_size=64, max_seq_len=64, attention=contract.SMALL["A"],
                      moe=contract.SMALL["E"], mla=SMALL)
    check_trains_with_taps(cfg, "D")


@pytest.mark.filterwarnings("ignore")
def test_deepseek_v3_layer_at_full_size(tmp_path: Path) -> None:
    """DeepSeek-V3's published attention config (YaRN x40, mscale 1) through ``mla_options``: a D block on the meta
    device holds exactly the parameters of transformers' layer, its cache 512 + 64 numbers per token (an A block
    of 128 heads of 192 would hold 2 x 128 x 192), and the softmax scale carries YaRN's correction."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hc = tf.DeepseekV3Config(rope_parameters=yarn, max_position_embeddings=163840)
    (tmp_path / "config.json").write_text(json.dumps({**hc.to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}))
    save_file({"unused": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    options = mla_options(Source(tmp_path))
    cfg = ModelConfig(pattern="D", d_model=hc.hidden_size, max_seq_len=hc.max_position_embeddings, mla=options)
    with torch.device("meta"):
        ours = MLAMixer(cfg.mla, cfg.dims, cfg.parsed.layers[0])
        theirs = DeepseekV3Attention(hc, 0)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) and n > 180e6
    cache = ours.init_cache(1, 8, device="meta")
    assert cache.latent.shape[-1] == 576 < 2 * 128 * 192
    assert ours.scale == pytest.approx(theirs.scaling, rel=1e-12) and ours.rope_factor == pytest.approx(1.0)
