"""Exporting the zoo's classes back to transformers (``amer export --format transformers``): Mamba, Falcon-Mamba,
LFM2, OLMo-Hybrid, Granite and Qwen2/3 with per-layer windows, each a round trip (transformers -> amer -> a
transformers folder -> ``AutoModelForCausalLM.from_pretrained``) to 1e-5 in the logits, and models built in amer
of those patterns; what a class cannot express is refused by name. Also: what the export writes for the
tokenizer of a folder that has none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import VOCAB, build_source, export_round_trip, tokens
from test_import_zoo import LFM2, LLAMA, MAMBA, MIXED, OLMO

from amer.errors import InputError
from amer.interop import export_transformers, from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


CASES = [
    ("MambaForCausalLM", "MambaConfig", dict(use_bias=True, **MAMBA)),
    ("FalconMambaForCausalLM", "FalconMambaConfig", dict(mixer_rms_eps=1e-3, **MAMBA)),
    ("Lfm2ForCausalLM", "Lfm2Config", dict(conv_bias=True, tie_word_embeddings=False, **LFM2)),
    ("OlmoHybridForCausalLM", "OlmoHybridConfig", OLMO),
    ("OlmoHybridForCausalLM", "OlmoHybridConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": None},
                                                       linear_allow_neg_eigval=False, **OLMO)),
    ("GraniteForCausalLM", "GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.4,
                                                 attention_multiplier=0.3, logits_scaling=2.5, **LLAMA)),
    ("Qwen3ForCausalLM", "Qwen3Config", dict(use_sliding_window=True, sliding_window=3, layer_types=MIXED, head_dim=16,
                                             **LLAMA)),
    ("Qwen2ForCausalLM", "Qwen2Config", dict(use_sliding_window=True, sliding_window=3, layer_types=MIXED, **LLAMA)),
]


@pytest.mark.parametrize("cls,cfg_cls,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    build_source(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]
    _, again = from_transformers(tmp_path / "out")  # and the exported folder imports to the same config
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs


def test_models_built_in_amer_export(tmp_path: Path) -> None:
    """Fresh amer models of the zoo's patterns (as trained in amer: default initialisation) round trip too."""
    from amer import HybridLM, ModelConfig

    base = dict(d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1, moe={"n_experts": 1, "d_ff": 48})
    cases = {
        "MambaForCausalLM": dict(pattern="(S)*3", mamba1={"d_state": 8}),
        "Lfm2ForCausalLM": dict(pattern="CECEAECE", attention={"n_heads": 4, "n_kv_heads": 2, "qk_norm": True}),
        "OlmoHybridForCausalLM": dict(
            pattern="G E A E.post", deltanet={"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "norm_eps": 1e-5},
            attention={"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_scope": "projection",
                       "norm_placement": "post"},
            moe={"n_experts": 1, "d_ff": 48, "variants": {"post": {"norm_placement": "post"}}}),
        "Qwen3ForCausalLM": dict(pattern="(AE)*2", attention={"n_heads": 4, "n_kv_heads": 2, "qk_norm": True,
                                                               "window": 5}),
    }
    for cls, kw in cases.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**{**base, **kw})
        model = HybridLM(cfg).eval()
        with torch.no_grad():  # norm gains away from 1, so a misplaced norm shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        assert export_round_trip(model, cfg, tmp_path / cls) <= ATOL, cls
        assert json.loads((tmp_path / cls / "config.json").read_text())["architectures"] == [cls]


def test_what_the_classes_cannot_express_is_refused(tmp_path: Path) -> None:
    from amer import HybridLM, ModelConfig

    base = dict(d_model=32, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 1, "d_ff": 48})
    refused = [
        (dict(pattern="SS", mamba1={"dt_bc_norm": "weighted"}), r"mamba1.dt_bc_norm='weighted' has no counterpart"),
        (dict(pattern="SS", norm_placement="post"), r"norm_placement 'post'; MambaForCausalLM places it 'pre'"),
        (dict(pattern="CEAE", attention={"qk_norm": False}), r"LFM2's attention normalises q and k per head"),
        (dict(pattern="CECE", moe={"n_experts": 1, "d_ff": 48, "bias": True}),
         r"Lfm2ForCausalLM's feed-forwards are silu without biases \(moe.activation 'silu', moe.bias True\)"),
        (dict(pattern="CE C.wide E", shortconv={"variants": {"wide": {"l_cache": 5}}}),
         r"C.wide \(layer 2\): Lfm2ForCausalLM has one config per shortconv block"),
        (dict(pattern="G E G E"), r"OlmoHybridForCausalLM needs at least one attention layer"),
        (dict(pattern="G E A E", attention={"norm_placement": "post"}), r"'A E.post' \(post-norm"),
        (dict(pattern="SS", logit_softcap=3.0), r"model.logit_softcap=3.0 has no counterpart in MambaForCausalLM"),
        (dict(pattern="A E A.swa E", attention={"qk_norm": True, "variants": {"swa": {"window": 4,
                                                                                        "rope_theta": 100.0}}}),
         r"may differ from the attention table only in its window"),
        (dict(pattern="SSAA"), r"pattern 'SSAA'"),
        (dict(pattern="CECE", shortconv={"residual_multiplier": 0.5}),
         r"C \(layer 0\) has the block option residual_multiplier=0.5, which Lfm2ForCausalLM lacks"),
    ]
    for kw, message in refused:
        cfg = ModelConfig(**{**base, **kw})
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    # negative control of the variant check: the same S*2 model exports when its options are the class's
    cfg = ModelConfig(**{**base, "pattern": "SS"})
    export_transformers(HybridLM(cfg), cfg, tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").is_file()


@pytest.mark.parametrize("vocab", [256, 1000])
def test_an_imported_folder_without_a_tokenizer_exports_none(tmp_path: Path, vocab: int,
                                                            capsys: pytest.CaptureFixture) -> None:
    """``amer import`` of a folder without tokenizer.json, then ``amer export --format transformers``: no
    tokenizer.json and no special ids (null in config.json, so neither the byte tokenizer's 256/257/258 nor the
    class's own defaults apply); transformers loads it at vocabulary 256 (which refused it with byte ids) and at 1000
    (which loaded wrong ids), and it computes the source's function."""
    from amer.cli import main

    hf = build_source(tmp_path / "src", "Lfm2ForCausalLM", "Lfm2Config", **{**LFM2, "vocab_size": vocab})
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "amer")]) == 0
    assert not (tmp_path / "amer" / "tokenizer.json").exists()
    assert main(["export", str(tmp_path / "amer"), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (None, None, None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert back.config.pad_token_id is None and back.config.eos_token_id is None
    with torch.no_grad():
        diff = (back(input_ids=tokens(), use_cache=False).logits - hf(input_ids=tokens(), use_cache=False).logits)
    assert diff.abs().max() <= ATOL
    # the amer format keeps the folder as it is: no byte tokenizer appears there either
    assert main(["export", str(tmp_path / "amer"), str(tmp_path / "again")]) == 0
    assert not (tmp_path / "again" / "tokenizer.json").exists()


def test_old_byte_checkpoints_keep_the_byte_tokenizer(tmp_path: Path) -> None:
    """Negative control of the rule above: an amer training checkpoint without tokenizer.json (written before
    tokenizers were saved, all byte-level) still exports with the byte tokenizer and its ids, which its vocabulary
    of 260 holds; a tokenizer whose ids the vocabulary cannot hold is refused by name."""
    import amer.cli.train as train_cli
    from amer.cli import main
    from amer.data import ByteTokenizer

    argv = ["--preset", "tiny", "--out-dir", str(tmp_path), "--run-name", "old", "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--eval-batches", "1"]
    assert train_cli.main(argv) == 0
    ckpts = sorted((tmp_path / "old").glob("step_*"))
    (ckpts[-1] / "tokenizer.json").unlink()
    assert main(["export", str(ckpts[-1]), str(tmp_path / "amer")]) == 0
    assert (tmp_path / "amer" / "tokenizer.json").is_file()
    from amer import HybridLM, ModelConfig

    cfg = ModelConfig(pattern="(AE)*1", d_model=32, vocab_size=256, max_seq_len=64, moe={"n_experts": 1})
    with pytest.raises(InputError, match="the tokenizer's bos id 256 is outside the model's vocabulary of 256"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "x", tokenizer=ByteTokenizer())


LINEAR = {"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
SMALL = dict(LLAMA, head_dim=8)


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("LlamaForCausalLM", "LlamaConfig", dict(LLAMA, rope_parameters=LINEAR)),
    ("MixtralForCausalLM", "MixtralConfig", dict(LLAMA, num_local_experts=4, rope_parameters=LINEAR)),
    ("Qwen2ForCausalLM", "Qwen2Config", LLAMA),  # every layer full: still Qwen2 (q/k/v biases, no output bias)
    ("GraniteForCausalLM", "GraniteConfig", dict(LLAMA, attention_multiplier=0.3, rope_parameters=LINEAR)),
    ("Olmo2ForCausalLM", "Olmo2Config", dict(LLAMA, rope_parameters=LLAMA3, pad_token_id=0, eos_token_id=1)),
    ("Gemma2ForCausalLM", "Gemma2Config", dict(SMALL, sliding_window=4, query_pre_attn_scalar=8,
                                               rope_parameters=LINEAR)),
    ("Lfm2ForCausalLM", "Lfm2Config", dict(LFM2, rope_parameters=LINEAR)),
])
def test_round_trip_keeps_the_rope_scaling(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    """Linear and Llama 3.1 RoPE scaling are written back as the class's rope_parameters (plain RoPE in their place
    is another function), and plain Qwen2 exports as itself."""
    build_source(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == [cls]
    assert conf["rope_parameters"]["rope_type"] == (kw.get("rope_parameters") or {}).get("rope_type", "default")


def test_mamba2_options_the_class_lacks_are_refused(tmp_path: Path) -> None:
    """A Mamba-2 stack whose options Mamba2ForCausalLM lacks is refused by name (it was written as if plain: a
    different function, or a folder transformers could not load); control: the plain stack round trips."""
    from amer import HybridLM, ModelConfig

    base = dict(pattern="MM", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1)
    for mamba, field in [({"norm": "before_gate"}, "norm"), ({"norm": "none"}, "norm"),
                         ({"dt_clamp_min": 0.3}, "dt_clamp_min"), ({"d_inner": 48, "head_dim": 16}, "d_inner")]:
        cfg = ModelConfig(**base, mamba={"head_dim": 16, **mamba})
        with pytest.raises(InputError, match=rf"mamba.{field}=.* has no counterpart in Mamba2ForCausalLM"):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    cfg = ModelConfig(**base, mamba={"head_dim": 16})
    assert export_round_trip(HybridLM(cfg).eval(), cfg, tmp_path / "ok") <= ATOL


def test_classes_that_never_tie_get_a_head_of_their_own(tmp_path: Path) -> None:
    """A tied amer model written as Kimi Linear (whose head is never the embedding) carries a copy of the embedding
    as its head; Nemotron-H's Mamba biases are written as the use_bias it reads."""
    import dataclasses

    from test_import_latent import KIMI
    from test_import_moe import NEMOTRON

    from amer import HybridLM

    build_source(tmp_path / "kimi", "KimiLinearForCausalLM", "KimiLinearConfig", **KIMI)
    model, cfg = from_transformers(tmp_path / "kimi")
    tied_cfg = dataclasses.replace(cfg, tie_embeddings=True)
    tied = HybridLM(tied_cfg).eval()
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert export_round_trip(tied, tied_cfg, tmp_path / "kimi_out") <= ATOL
    build_source(tmp_path / "nem", "NemotronHForCausalLM", "NemotronHConfig", use_bias=True,
                 layers_block_type=["mamba", "moe", "attention", "moe"], **NEMOTRON)
    model, cfg = from_transformers(tmp_path / "nem")
    assert cfg.mamba.bias
    assert export_round_trip(model, cfg, tmp_path / "nem_out") <= ATOL
    assert json.loads((tmp_path / "nem_out" / "config.json").read_text())["use_bias"] is True


@pytest.mark.parametrize("kw", [dict(partial_rotary_factor=0.5), dict(partial_rotary_factor=0.5, sliding_window=4),
                                dict(partial_rotary_factor=0.25, head_dim=16)], ids=["half", "window", "head_dim"])
def test_partial_rope_exports_as_phi3(tmp_path: Path, kw: dict[str, Any]) -> None:
    """Partial RoPE on Llama-style layers is Phi-3's (fused projections written as amer holds them); a Phi-3 folder
    round trips and imports back to the same config."""
    factor = kw.pop("partial_rotary_factor")
    build_source(tmp_path / "src", "Phi3ForCausalLM", "Phi3Config", pad_token_id=0, eos_token_id=1, **LLAMA, **kw,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": factor})
    model, cfg = from_transformers(tmp_path / "src")
    assert cfg.attention.rope_fraction == factor
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs


def test_models_built_in_amer_with_partial_rope(tmp_path: Path) -> None:
    """An amer model that rotates part of each head (none at all: rope_fraction 0) exports as Phi-3, with attention
    biases as Bamba; what neither has (q/k/v biases without an output bias, routed experts, RoPE scaling) is refused
    by name."""
    from amer import HybridLM, ModelConfig

    base = dict(pattern="(AE)*2", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1)
    for fraction in (0.5, 0.0):
        torch.manual_seed(0)
        cfg = ModelConfig(**base, attention={"rope_fraction": fraction}, moe={"n_experts": 1, "d_ff": 48})
        assert export_round_trip(HybridLM(cfg).eval(), cfg, tmp_path / f"ok{fraction}") <= ATOL
        biased = ModelConfig(**base, attention={"rope_fraction": fraction, "qkv_bias": True, "out_bias": True},
                             moe={"n_experts": 1, "d_ff": 48})
        assert export_round_trip(HybridLM(biased).eval(), biased, tmp_path / f"bamba{fraction}") <= ATOL
        assert json.loads((tmp_path / f"bamba{fraction}" / "config.json").read_text())["architectures"] == [
            "BambaForCausalLM"]
    for attn, moe, message in [
        ({"qkv_bias": True}, {"n_experts": 1}, "BambaForCausalLM's attention_bias sets the q/k/v and output biases"),
        ({}, {"n_experts": 4}, r"rope_fraction=0.5 has no counterpart in the Llama, Mistral, Qwen3 and Mixtral"),
        ({"rope_linear_factor": 2.0}, {"n_experts": 1}, "rope_linear_factor=2.0 has no counterpart in Phi3ForCausalLM"),
    ]:
        cfg = ModelConfig(**base, attention={"rope_fraction": 0.5, **attn}, moe=moe)
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
        assert not (tmp_path / "x").exists()


def _head_width_cases() -> list[tuple[str, str, dict[str, Any]]]:
    from test_export_moe import CASES as MOE_CASES

    wide = ("Lfm2ForCausalLM", "OlmoHybridForCausalLM", "GraniteForCausalLM", "JambaForCausalLM",
            "GraniteMoeHybridForCausalLM", "Lfm2MoeForCausalLM")
    return [(c, cc, {**kw, "head_dim": 16}) for c, cc, kw in CASES + MOE_CASES if c in wide]


@pytest.mark.parametrize("cls,cfg_cls,kw", _head_width_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_heads_of_another_width_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    """Attention heads wider than hidden / heads (16 at width 32 with 4 heads): these classes read head_dim, so the
    export writes it (it was refused)."""
    build_source(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert cfg.attention.head_dim == 16
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]


def test_olmoe_heads_stay_hidden_over_heads_wide(tmp_path: Path) -> None:
    """OLMoE's q/k norms span hidden_size, so its heads cannot be wider: refused by name (control: the same model at
    the default width exports)."""
    from amer import HybridLM, ModelConfig

    base = dict(pattern="(AE)*2", d_model=32, vocab_size=VOCAB, max_seq_len=64,
                moe={"n_experts": 4, "top_k": 2, "renormalize": False})
    for head_dim, ok in ((16, False), (None, True)):
        cfg = ModelConfig(**base, attention={"n_heads": 4, "n_kv_heads": 2, "head_dim": head_dim, "qk_norm": True,
                                             "qk_norm_scope": "projection"})
        if ok:
            export_transformers(HybridLM(cfg), cfg, tmp_path / "ok")
            assert json.loads((tmp_path / "ok" / "config.json").read_text())["architectures"] == ["OlmoeForCausalLM"]
        else:
            with pytest.raises(InputError, match="its q/k norms span hidden_size"):
                export_transformers(HybridLM(cfg), cfg, tmp_path / "x")


def test_position_free_attention_with_granite_scales(tmp_path: Path) -> None:
    """Attention layers without RoPE and Granite's multipliers (with attention biases or not): Granite-4.0-H with every
    layer attention (Granite's dense class always turns RoPE); biases without the multipliers: Bamba (Phi-3, the
    other class with partial or no RoPE, has no biases)."""
    from amer import HybridLM, ModelConfig

    base = dict(pattern="(AE)*2", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                moe={"n_experts": 1, "d_ff": 48})
    scales = dict(logit_scale=0.5, embed_scale=2.0, residual_scale=0.7)
    biases = {"rope_fraction": 0.0, "qkv_bias": True, "out_bias": True}
    for kw, arch in ((dict(attention={"rope_fraction": 0.0}, **scales), "GraniteMoeHybridForCausalLM"),
                     (dict(attention=biases, **scales), "GraniteMoeHybridForCausalLM"),  # its attention_bias
                     (dict(attention=biases), "BambaForCausalLM")):
        torch.manual_seed(0)
        cfg = ModelConfig(**base, **kw)
        assert export_round_trip(HybridLM(cfg).eval(), cfg, tmp_path / arch) <= ATOL
        assert json.loads((tmp_path / arch / "config.json").read_text())["architectures"] == [arch]
