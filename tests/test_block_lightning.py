"""Lightning attention (the N family): the mixer against a token-by-token recurrence written here (fp64,
outputs and gradients), its decay rates against MiniMax's, parity with transformers' ``MiniMaxLightningAttention``
(weights mapped by :mod:`amer.interop.lightning` from a saved folder; forward and token by token through each
side's cache), and a MiniMax decoder layer (lightning or full attention, then its feed-forward) as two amer blocks
with the residual options (``residual_normed``, alpha / beta as ``residual_multiplier`` / ``update_multiplier``).

Causality, gradient reach, prefill == decoding, split prefills, packed documents, meta build and compilation
of the N block run for every family in test_mixer_contract.py / test_documents.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from mixer_checks import assert_matches_reference, check_trains_with_taps
from torch import Tensor

from amer import HybridLM, ModelConfig
from amer.blocks.common import Block
from amer.blocks.lightning import LightningCache, LightningMixer, lightning_slopes
from amer.errors import CheckpointError, ConfigError
from amer.interop.common import attention_options, attention_weights
from amer.interop.lightning import lightning_options, lightning_weights, minimax_block_options
from amer.interop.source import Source

D = 32


def make_mixer(seed: int = 0, pattern: str = "NN", **options: Any) -> LightningMixer:
    cfg = ModelConfig(pattern=pattern, d_model=D, max_seq_len=64, init_std=0.2,
                      lightning={"chunk_size": 8, **options})
    torch.manual_seed(seed)
    m = LightningMixer(cfg.lightning, cfg.dims, cfg.parsed.layers[0])
    with torch.no_grad():
        m.norm.weight.add_(0.3 * torch.randn_like(m.norm.weight))
    return m


def reference(m: LightningMixer, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S_t = exp(-s_h) S_{t-1} + k_t^T v_t, o_t = q_t S_t, one step at a time; then norm, gate, out_proj."""
    B, T, _ = x.shape
    H, hd = m.H, m.hd
    qkv = F.linear(x, m.qkv_proj.weight)
    if m.cfg.activation == "silu":
        qkv = qkv * torch.sigmoid(qkv)
    qkv = qkv.view(B, T, H, 3, hd)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    decay = torch.exp(-m.slope.to(x.dtype))[None, :, None, None]
    S = torch.zeros(B, H, hd, hd, dtype=x.dtype) if state is None else state.to(x.dtype)
    outs = []
    for t in range(T):
        S = decay * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1).reshape(B, T, H * hd)
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight
    if m.gate_proj is not None:
        o = torch.sigmoid(F.linear(x, m.gate_proj.weight)) * o
    return F.linear(o, m.out_proj.weight), S


VARIANTS = [{}, {"activation": "none", "output_gate": False, "head_dim": 12, "depth_decay": False}]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_mixer_matches_recurrence_fp64(options: dict[str, Any]) -> None:
    """The chunked training path (T = 37 over chunks of 8), its gradients, and decoding from a prefill equal the
    recurrence; the decoding state is the recurrence's (stored (v, k), the transpose of S)."""
    m = make_mixer(**options).double()
    x = torch.randn(2, 37, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, (y_ref, S) = m(x).y, reference(m, x)
    assert_matches_reference(y, y_ref, list(m.named_parameters()), probe_seed=2, tol=1e-10, grad_rtol=1e-8,
                             grad_atol=1e-10)
    with torch.no_grad():
        out = m(x[:, :13], cache=m.init_cache(2, 37, dtype=torch.float64))
        ys, cache = [out.y], out.cache
        for t in range(13, 37):
            out = m(x[:, t:t + 1], cache=cache)
            ys.append(out.y)
            cache = out.cache
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache.state, S.transpose(-1, -2), rtol=1e-10, atol=1e-10)
    assert cache.state.shape == (2, m.H, m.hd, m.hd)  # O(1): no per-token growth


def test_decays_follow_depth() -> None:
    """ALiBi's slopes times 1 - depth: the first block forgets fastest, ``depth_stride`` 2 counts two blocks as one
    step, ``depth_decay`` off keeps the plain slopes; the rates are recomputed on a model given its weights."""
    s = lightning_slopes(8, 8.0)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    cfg = ModelConfig(pattern="NENENE", d_model=D, lightning={"depth_stride": 2})
    model = HybridLM(cfg)
    rates = [b.mixer.slope for b in model.blocks if b.layer.family == "N"]
    want = [lightning_slopes(4, 8.0, (layer, 3)) for layer in range(3)]
    for got, w in zip(rates, want):
        assert torch.equal(got, w)
    assert rates[0][0] > rates[1][0] > rates[2][0] > 0
    empty = HybridLM.empty(cfg).assign({k: v.clone() for k, v in model.state_dict().items()})
    assert torch.equal(empty.blocks[2].mixer.slope, rates[1]) and "slope" not in "".join(model.state_dict())
    flat = ModelConfig(pattern="NN", d_model=D, lightning={"depth_decay": False})
    assert torch.equal(HybridLM(flat).blocks[1].mixer.slope, lightning_slopes(4, 8.0))


@pytest.mark.parametrize("options,message", [
    ({"activation": "gelu"}, r"lightning.activation must be one of \['silu', 'none'\]"),
    ({"n_heads": 3}, r"d_model \(32\) must be divisible by lightning.n_heads \(3\)"),
    ({"depth_stride": 0}, "depth_stride"),
])
def test_bad_settings_are_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(pattern="N", d_model=32, lightning=options)


# ------------------------------------------------------------------------------------------------
# MiniMax: its lightning attention, and a decoder layer as two blocks with the residual options

MINIMAX = dict(hidden_size=D, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               intermediate_size=48, num_local_experts=1, num_experts_per_tok=1, vocab_size=64, block_size=8,
               layer_types=["linear_attention", "linear_attention", "full_attention"],
               linear_attn_alpha_factor=0.7, linear_attn_beta_factor=1.3, full_attn_alpha_factor=1.1,
               full_attn_beta_factor=0.6, mlp_alpha_factor=0.9, mlp_beta_factor=1.4, rms_norm_eps=1e-5)
LAYER = 1  # a middle layer: its depth factor is neither 1 nor ~0


def minimax_layer(tmp_path: Path, layer_idx: int = LAYER) -> tuple[Any, Any, Source]:
    """A random MiniMax decoder layer (norm gains away from 1) and a folder holding it as layer ``layer_idx``."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers.models.minimax.modeling_minimax import MiniMaxDecoderLayer

    hc = tf.MiniMaxConfig(**MINIMAX)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = MiniMaxDecoderLayer(hc, layer_idx).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():  # a standalone layer is not initialised (experts are empty)
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    pre = f"model.layers.{layer_idx}."
    save_file({pre + k: v.contiguous() for k, v in layer.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**hc.to_dict(), "architectures": ["MiniMaxForCausalLM"]}))
    return layer, hc, Source(tmp_path)


def amer_lightning(src: Source, layer_idx: int = LAYER) -> LightningMixer:
    state: dict[str, Tensor] = {}
    lightning_weights(src, f"model.layers.{layer_idx}.self_attn.", 2 * layer_idx, layer_idx, state)
    # the mixer stands at block 2 l of the 2 L blocks MiniMax's L layers become
    cfg = ModelConfig(pattern="NE" * MINIMAX["num_hidden_layers"], d_model=D, moe={"n_experts": 1},
                      lightning={**lightning_options(src), "chunk_size": 8})
    m = LightningMixer(cfg.lightning, cfg.dims, cfg.parsed.layers[2 * layer_idx]).eval()
    m.load_state_dict({k.removeprefix(f"blocks.{2 * layer_idx}.mixer."): v for k, v in state.items()}, strict=True)
    return m


@pytest.mark.filterwarnings("ignore")
def test_transformers_parity(tmp_path: Path) -> None:
    """The full forward (T = 27 over MiniMax's blocks of 8 and amer's chunks of 8) and a prefill then token-by-token
    decoding through each side's cache equal ``MiniMaxLightningAttention`` (fp32, 1e-5)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    layer, _, src = minimax_layer(tmp_path)
    m = amer_lightning(src)
    ref = layer.self_attn
    x = torch.randn(2, 27, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(x, None, None)[0]
        fwd = (m(x).y - want).abs().max().item()
        hf_cache, cache, theirs, ours = MiniMaxCache(), m.init_cache(2, 27), [], []
        for s, e in [(0, 5), *((t, t + 1) for t in range(5, 27))]:
            theirs.append(ref(x[:, s:e], None, None, cache=hf_cache)[0])
            out = m(x[:, s:e], cache=cache)
            ours.append(out.y)
            cache = out.cache
        dec = (torch.cat(ours, 1) - torch.cat(theirs, 1)).abs().max().item()
    print(f"MiniMaxLightningAttention: forward {fwd:.2e} decode {dec:.2e}")
    assert fwd <= 1e-5 and dec <= 1e-5, (fwd, dec)
    assert isinstance(cache, LightningCache)
    # negative control: the same weights at another depth decay differently
    wrong = LightningMixer(m.cfg, m.dims, ModelConfig(pattern="NENENE", d_model=D).parsed.layers[0]).eval()
    wrong.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (wrong(x).y - want).abs().max() > 1e-3


def test_stored_rates_are_checked(tmp_path: Path) -> None:
    """A checkpoint whose stored slope_rate is not MiniMax's rule at that depth is refused, not silently replaced."""
    from safetensors.torch import load_file, save_file

    _, _, src = minimax_layer(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights[f"model.layers.{LAYER}.self_attn.slope_rate"] *= 1.5
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="slope_rate .* is not MiniMax's rule at layer 1"):
        amer_lightning(Source(tmp_path))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("layer_idx", [LAYER, 2], ids=["lightning", "full_attention"])
def test_minimax_decoder_layer_is_two_blocks(tmp_path: Path, layer_idx: int) -> None:
    """``h = norm1(x); x = a1 h + b1 attn(h); h = norm2(x); x = a2 h + b2 mlp(h)`` (one expert: a dense SwiGLU)
    equals a mixer block then an E block with ``residual_normed`` and the alpha / beta factors as block options;
    negative control: the same blocks with the default options differ."""
    layer, hc, src = minimax_layer(tmp_path, layer_idx)
    kind = "linear_attn" if hc.layer_types[layer_idx] == "linear_attention" else "full_attn"
    letter = "N" if kind == "linear_attn" else "A"
    pre = f"model.layers.{layer_idx}."
    attn = attention_options(src)
    mixer_table = ({**lightning_options(src), "chunk_size": 8} if letter == "N" else attn)
    key = "lightning" if letter == "N" else "attention"
    L = hc.num_hidden_layers
    cfg = ModelConfig(pattern="".join("NE" if t == "linear_attention" else "AE" for t in hc.layer_types), d_model=D,
                      max_seq_len=64, norm_eps=hc.rms_norm_eps,
                      **{key: {**mixer_table, **minimax_block_options(src, kind)}},
                      moe={"n_experts": 1, "d_ff": hc.intermediate_size, **minimax_block_options(src, "mlp")})
    state: dict[str, Tensor] = {}
    blk = 2 * layer_idx
    if letter == "N":
        lightning_weights(src, pre + "self_attn.", blk, layer_idx, state)
    else:
        attention_weights(src, pre + "self_attn.", blk, state)
    state[f"blocks.{blk}.norm.weight"] = src.get(pre + "input_layernorm.weight")
    state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
    w = src.get(pre + "mlp.experts.gate_up_proj")[0]  # (2F, D): gate rows, then up rows
    state[f"blocks.{blk + 1}.mixer.w_gate_up"] = w.T.unsqueeze(0).contiguous()
    state[f"blocks.{blk + 1}.mixer.w_down"] = src.get(pre + "mlp.experts.down_proj")[0].T.unsqueeze(0).contiguous()
    assert len(cfg.parsed.layers) == 2 * L
    model = HybridLM(cfg).eval()
    blocks = [model.blocks[blk], model.blocks[blk + 1]]
    own = {f"blocks.{blk + i}.{k}": v for i, b in enumerate(blocks) for k, v in b.state_dict().items()}
    assert set(own) == set(state)
    for name, t in state.items():
        i, rest = int(name.split(".")[1]) - blk, name.split(".", 2)[2]
        blocks[i].state_dict()[rest].copy_(t)
    x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(19)[None]
    with torch.no_grad():
        rope = None
        if letter == "A":
            from transformers.models.minimax.modeling_minimax import MiniMaxRotaryEmbedding
            rope = MiniMaxRotaryEmbedding(hc)(x, pos)
        mask = torch.zeros(1, 1, 19, 19).masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
        want = layer(x, position_embeddings=rope, attention_mask=mask if letter == "A" else None, position_ids=pos)
        got = blocks[1](blocks[0](x)[0])[0]
        assert (got - want).abs().max() <= 1e-5
        plain = [Block(b.mixer.cfg if letter == "N" else cfg.attention, cfg.dims, b.layer) for b in blocks[:1]]
        plain[0].load_state_dict(blocks[0].state_dict())
        assert (plain[0](x)[0] - blocks[0](x)[0]).abs().max() > 1e-2


def test_model_with_n_blocks_trains_and_decodes() -> None:
    """ANENE: N-1 selects the last N block's tap; a few AdamW steps on CE lower the loss with every gradient live
    (decoding against the full forward is the mixer contract's, for every family)."""
    cfg = ModelConfig(pattern="ANENE", d_model=32, vocab_size=64, max_seq_len=64, attention=contract.SMALL["A"],
                      moe=contract.SMALL["E"], lightning={"chunk_size": 8})
    check_trains_with_taps(cfg, "N")


@pytest.mark.filterwarnings("ignore")
def test_minimax_layer_at_full_size(tmp_path: Path) -> None:
    """MiniMax-Text-01's attention shape (width 6144, 64 heads of 128, 80 layers) through ``lightning_options``: an N
    block on the meta device holds exactly the parameters of transformers' layer, its decoding state is 64 heads of
    128 x 128 whatever the context, and layer 40's rates are MiniMax's."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    hc = tf.MiniMaxConfig(hidden_size=6144, num_attention_heads=64, head_dim=128, num_hidden_layers=80,
                          num_key_value_heads=8, intermediate_size=9216, num_local_experts=2)
    (tmp_path / "config.json").write_text(json.dumps({**hc.to_dict(), "architectures": ["MiniMaxForCausalLM"]}))
    save_file({"unused": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    cfg = ModelConfig(pattern="NE" * 80, d_model=6144, lightning=lightning_options(Source(tmp_path)),
                      moe={"n_experts": 1})
    with torch.device("meta"):
        ours = LightningMixer(cfg.lightning, cfg.dims, cfg.parsed.layers[80])
        theirs = MiniMaxLightningAttention(hc, 40)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.init_cache(1, 1 << 20, device="meta").state.shape == (1, 64, 128, 128)
    assert torch.equal(ours.slopes(), theirs.get_slope_rate().flatten())
