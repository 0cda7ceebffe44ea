"""Importing the zoo's newer transformers classes (Mamba-1, Falcon-Mamba, LFM2, OLMo-Hybrid, Granite, Phi-3, Qwen3
with mixed sliding / full layers): the same logits in amer to 1e-5 in fp32, on a batch and token by token through
amer's decoding caches, and a negative control per class (one source weight perturbed: the logits move).

As in ``test_import.py``: a small random-initialised transformers model is saved with ``save_pretrained`` and
the folder imported (amer reads it without transformers); 1-D weights (norms, biases) are perturbed away from
their 1 / 0 initialisation so a weight mapped to the wrong place shows up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_import import (
    assert_same_function_and_control,
    build_source,
    edit_config,
    reference_logits,
    tokens,
)

from amer.errors import CheckpointError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


MAMBA = dict(hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4, time_step_rank=4)


@pytest.mark.parametrize("bias", [False, True])
def test_mamba1(tmp_path: Path, bias: bool) -> None:
    hf = build_source(tmp_path, "MambaForCausalLM", "MambaConfig", use_bias=bias, **MAMBA)
    assert_same_function_and_control(hf, tmp_path, "backbone.layers.1.mixer.x_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(S)*3" and cfg.mamba1.dt_rank == 4 and cfg.mamba1.bias == bias
    assert cfg.mamba1.dt_bc_norm == "none"


def test_falcon_mamba(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "FalconMambaForCausalLM", "FalconMambaConfig", mixer_rms_eps=1e-3,
                      tie_word_embeddings=False, **MAMBA)
    assert_same_function_and_control(hf, tmp_path, "backbone.layers.2.mixer.dt_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.mamba1.dt_bc_norm == "weightless" and cfg.mamba1.dt_bc_norm_eps == 1e-3 and not cfg.tie_embeddings


LFM2 = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            block_multiple_of=16, layer_types=["conv", "full_attention", "conv", "conv"])


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_lfm2(tmp_path: Path, bias: bool, tied: bool) -> None:
    hf = build_source(tmp_path, "Lfm2ForCausalLM", "Lfm2Config", conv_bias=bias, tie_word_embeddings=tied,
                      **LFM2)
    with torch.no_grad():  # transformers starts the filter at N(0, 0.1) like its projections: make it matter
        for layer in hf.model.layers:
            if hasattr(layer, "conv"):
                layer.conv.conv.weight.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    assert_same_function_and_control(hf, tmp_path, "model.layers.1.self_attn.q_layernorm.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "CEAECECE" and cfg.moe.d_ff == 48 and cfg.shortconv.bias == bias
    assert cfg.attention.qk_norm and cfg.attention.rope_theta == 1e6


LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MIXED = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("cls", ["Qwen3", "Qwen2"])
def test_qwen_mixed_sliding_and_full_layers(tmp_path: Path, cls: str) -> None:
    """``layer_types`` mixing sliding-window and full attention: the sliding layers are the variant ``A.swa``; the
    negative control of the window itself: the same import with the variant's window removed no longer matches."""
    hf = build_source(tmp_path, f"{cls}ForCausalLM", f"{cls}Config", use_sliding_window=True, sliding_window=3,
                      layer_types=MIXED, **({"head_dim": 16} if cls == "Qwen3" else {}), **LLAMA)
    assert_same_function_and_control(hf, tmp_path, "model.layers.2.self_attn.k_proj.weight")
    build_source(tmp_path, f"{cls}ForCausalLM", f"{cls}Config", use_sliding_window=True, sliding_window=3,
                 layer_types=MIXED, **({"head_dim": 16} if cls == "Qwen3" else {}), **LLAMA)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "A E A.swa E A.swa E A E" and cfg.attention.window is None
    assert cfg.family_config("A", "swa").window == 3
    assert [b.mixer.window for b in model.blocks[::2]] == [None, 3, 3, None]
    for blk in model.blocks[2:6:2]:
        blk.mixer.window = None
    with torch.no_grad():
        diff = (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()
    assert diff > 100 * ATOL
    # every layer sliding: the family's own window, no variant
    edit_config(tmp_path, layer_types=["sliding_attention"] * 4)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(AE)*4" and cfg.attention.window == 3
    edit_config(tmp_path, layer_types=MIXED, sliding_window=None)
    with pytest.raises(CheckpointError, match="sets no sliding_window"):
        from_transformers(tmp_path)


def test_granite(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "GraniteForCausalLM", "GraniteConfig", embedding_multiplier=3.0,
                      residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=2.5, attention_bias=True,
                      **LLAMA)
    assert_same_function_and_control(hf, tmp_path, "model.layers.3.self_attn.o_proj.bias")
    _, cfg = from_transformers(tmp_path)
    assert (cfg.embed_scale, cfg.residual_scale, cfg.logit_scale, cfg.attention.scale) == (3.0, 0.4, 0.4, 0.3)


@pytest.mark.parametrize("window", [None, 5])
def test_phi3(tmp_path: Path, window: int | None) -> None:
    """Fused qkv and gate_up projections, partial RoPE (half of each head rotated), a window on every layer."""
    hf = build_source(tmp_path, "Phi3ForCausalLM", "Phi3Config", sliding_window=window,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **LLAMA)
    assert_same_function_and_control(hf, tmp_path, "model.layers.0.mlp.gate_up_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.attention.rope_fraction == 0.5 and cfg.attention.window == window


def test_phi3_longrope_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Phi-3's long-context RoPE (per-frequency factors switched by the sequence length) cannot be expressed:
    ``amer import`` says so in one line and exits 2, writing nothing."""
    from amer.cli import main

    build_source(tmp_path / "src", "Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 **LLAMA)
    factors = [1.0] * 4
    edit_config(tmp_path / "src", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": factors,
                                                   "long_factor": factors, "partial_rotary_factor": 1.0})
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot import Phi3ForCausalLM: rope_type='longrope'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


OLMO = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, eos_token_id=1, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention",
                                                  "full_attention"])


@pytest.mark.parametrize("rope,neg", [(True, True), (False, False)])
def test_olmo_hybrid(tmp_path: Path, rope: bool, neg: bool) -> None:
    """Pre-norm G layers, post-norm attention layers (their E blocks the variant ``post``), q/k norms over the whole
    projections, grouped value heads; with RoPE, and without (the released checkpoints' NoPE)."""
    kw = {} if rope else {"rope_parameters": {"rope_type": "default", "rope_theta": None}}
    hf = build_source(tmp_path, "OlmoHybridForCausalLM", "OlmoHybridConfig", linear_allow_neg_eigval=neg, **kw,
                      **OLMO)
    assert (hf.model.rotary_emb is not None) == rope
    assert_same_function_and_control(hf, tmp_path, "model.layers.1.self_attn.q_norm.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "G E A E.post G E A E.post"
    assert cfg.attention.qk_norm_scope == "projection" and cfg.attention.rope_fraction == (1.0 if rope else 0.0)
    assert cfg.deltanet.allow_neg_eigval == neg and cfg.deltanet.n_v_heads == 4
    assert [cfg.block_options(layer).norm_placement for layer in cfg.parsed.layers[:4]] == ["pre", "pre", "post",
                                                                                          "post"]


def test_nemotron_h_silu_mlp_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Nemotron-H's MLP is ungated (up, act, down); with ``mlp_hidden_act="silu"`` that is no E activation (E's silu
    is the gated SwiGLU), and the refusal says so instead of failing on a gate projection the source never has."""
    build_source(tmp_path, "NemotronHForCausalLM", "NemotronHConfig", hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 layers_block_type=["linear_attention", "mlp"], mamba_num_heads=4, mamba_head_dim=16,
                 ssm_state_size=16, n_groups=2, chunk_size=8, mlp_hidden_act="silu")
    with pytest.raises(CheckpointError, match=r"mlp_hidden_act='silu' \(amer supports 'relu2'; Nemotron-H's MLP is "
                       r"ungated") as info:
        from_transformers(tmp_path)
    assert "gate_proj" not in str(info.value) and "\n" not in str(info.value)
