"""Importing what a config.json leaves out, or says where the class does not read it: amer computes what
transformers computes when it loads the same folder.

transformers fills a setting a config leaves out with its class's default (Phi-3's norms use eps 1e-5, Gemma 2
soft-caps its logits at 30, Qwen3-Next rotates a quarter of each head), reads ``partial_rotary_factor`` and
``sliding_window`` only in some classes, lets a legacy ``rope_scaling`` replace ``rope_parameters``, and unties a
head that the folder stores apart from the embedding. The reference here is always the class loaded from the edited
folder with ``AutoModelForCausalLM``; the negative controls show each mechanism is what makes the import match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import HYBRID, assert_same_function, build_source, edit_config, tokens
from test_import_latent import KIMI
from test_import_moe import NEMOTRON, NEXT, QWEN_MOE
from test_import_norms import GEMMA2

import amer.interop.source as source_mod
from amer.errors import CheckpointError, InputError
from amer.interop import from_transformers
from amer.interop.defaults import CLASS_DEFAULTS

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
LFM2 = dict(LLAMA, block_multiple_of=16, layer_types=["conv", "full_attention"])
LONG = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))  # longer than the windows below


def _loaded(path: Path) -> Any:
    """The class transformers builds from the folder (its defaults filled in, its own reading of the config)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


def _drop(path: Path, *keys: str, rope: tuple[str, ...] = ()) -> None:
    """Take ``keys`` out of config.json (and ``rope`` out of its rope_parameters)."""
    conf = json.loads((path / "config.json").read_text())
    for key in keys:
        conf.pop(key, None)
    for key in rope:
        conf.get("rope_parameters", {}).pop(key, None)
    (path / "config.json").write_text(json.dumps(conf))


def _diff(path: Path, ids: torch.Tensor | None = None) -> float:
    ids = tokens() if ids is None else ids
    model, _ = from_transformers(path)
    with torch.no_grad():
        return (model(ids, taps=False).logits - _loaded(path)(input_ids=ids, use_cache=False).logits).abs().max().item()


def test_class_defaults_are_the_classes() -> None:
    """Every default amer lays under a config is the installed class's own: the value it declares (before any
    other setting changes it), else the one a bare instance has."""
    for arch, defaults in CLASS_DEFAULTS.items():
        cls = getattr(transformers, arch).config_class
        conf = cls()
        rope = conf.rope_parameters if isinstance(getattr(conf, "rope_parameters", None), dict) else {}
        for key, value in defaults.items():
            declared = cls.__dict__.get(key)
            have = declared if isinstance(declared, (int, float, str)) else getattr(conf, key, rope.get(key))
            assert have == value, f"{arch}.{key}: the class has {have!r}, amer assumes {value!r}"


MISSING = [  # (class, config class, settings, keys left out of config.json, keys left out of its rope_parameters)
    ("Phi3ForCausalLM", "Phi3Config", dict(LLAMA, rms_norm_eps=1e-2), ("rms_norm_eps",), ()),
    ("Gemma2ForCausalLM", "Gemma2Config", GEMMA2,
     ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"), ()),
    ("Lfm2ForCausalLM", "Lfm2Config", dict(LFM2, norm_eps=1e-2), ("norm_eps", "rope_theta"), ("rope_theta",)),
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(NEXT, num_hidden_layers=4, num_experts=12, num_experts_per_tok=10),
     ("num_experts_per_tok", "partial_rotary_factor"), ("partial_rotary_factor",)),
    ("KimiLinearForCausalLM", "KimiLinearConfig", KIMI, ("routed_scaling_factor", "rms_norm_eps"), ()),
]


@pytest.mark.parametrize("cls,cfg_cls,kw,keys,rope", MISSING, ids=[m[0] for m in MISSING])
def test_left_out_settings_take_the_class_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: str,
                                                  cfg_cls: str, kw: dict[str, Any], keys: tuple[str, ...],
                                                  rope: tuple[str, ...]) -> None:
    build_source(tmp_path, cls, cfg_cls, **kw)
    _drop(tmp_path, *keys, rope=rope)
    hf = _loaded(tmp_path)
    assert_same_function(hf, tmp_path, ATOL)
    # negative control: without the class's defaults the same folder imports another function
    monkeypatch.setattr(source_mod, "CLASS_DEFAULTS", {})
    assert _diff(tmp_path) > 10 * ATOL


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("BambaForCausalLM", "BambaConfig", dict(HYBRID, attn_layer_indices=[1])),
    ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
     dict(HYBRID, num_local_experts=0, layer_types=["mamba", "attention", "mamba", "mamba"])),
])
def test_left_out_mamba_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: str, cfg_cls: str,
                                 kw: dict[str, Any]) -> None:
    """Bamba's and Granite-4.0-H's Mamba-2 conv width and head width left out: the class's 4 and "auto" (the width
    that fills expand x hidden_size), which were refused as missing. Control: without the defaults, refused."""
    build_source(tmp_path, cls, cfg_cls, **{k: v for k, v in kw.items() if k != "mamba_d_head"})
    _drop(tmp_path, "mamba_d_conv", "mamba_d_head")
    assert_same_function(_loaded(tmp_path), tmp_path, ATOL)
    monkeypatch.setattr(source_mod, "CLASS_DEFAULTS", {})
    with pytest.raises(CheckpointError, match="lacks 'mamba_d_(conv|head)'"):
        from_transformers(tmp_path)


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("LlamaForCausalLM", "LlamaConfig", LLAMA),
    ("MixtralForCausalLM", "MixtralConfig", dict(LLAMA, num_local_experts=4)),
    ("Lfm2ForCausalLM", "Lfm2Config", LFM2),
])
def test_a_partial_rotary_factor_the_class_does_not_read(tmp_path: Path, cls: str, cfg_cls: str,
                                                         kw: dict[str, Any]) -> None:
    """transformers 5 keeps partial_rotary_factor in rope_parameters for every class; these turn whole heads."""
    build_source(tmp_path, cls, cfg_cls, rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                          "partial_rotary_factor": 0.5}, **kw)
    assert from_transformers(tmp_path)[1].attention.rope_fraction == 1.0
    assert _diff(tmp_path) <= ATOL


def test_phi3_reads_its_partial_rotary_factor(tmp_path: Path) -> None:
    """The control: Phi-3's rotary embedding does read the factor."""
    build_source(tmp_path, "Phi3ForCausalLM", "Phi3Config", rope_parameters={
        "rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}, **LLAMA)
    assert from_transformers(tmp_path)[1].attention.rope_fraction == 0.5
    assert _diff(tmp_path) <= ATOL


def test_a_sliding_window_the_class_does_not_read(tmp_path: Path) -> None:
    """Llama has no sliding window; Phi-3 slides every layer whatever layer_types says; Mistral reads its window."""
    build_source(tmp_path / "llama", "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    edit_config(tmp_path / "llama", sliding_window=5)
    assert from_transformers(tmp_path / "llama")[1].attention.window is None
    assert _diff(tmp_path / "llama", LONG) <= ATOL
    build_source(tmp_path / "phi3", "Phi3ForCausalLM", "Phi3Config", sliding_window=5, **LLAMA)
    edit_config(tmp_path / "phi3", layer_types=["full_attention"] * 2)
    assert from_transformers(tmp_path / "phi3")[1].attention.window == 5
    assert _diff(tmp_path / "phi3", LONG) <= ATOL
    build_source(tmp_path / "mistral", "MistralForCausalLM", "MistralConfig", sliding_window=5, **LLAMA)
    assert from_transformers(tmp_path / "mistral")[1].attention.window == 5


def test_legacy_rope_scaling_replaces_rope_parameters(tmp_path: Path) -> None:
    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rope_scaling={"type": "linear", "factor": 4.0})
    assert from_transformers(tmp_path)[1].attention.rope_linear_factor == 4.0
    assert _diff(tmp_path, LONG) <= ATOL


def test_tied_flag_with_a_head_of_its_own(tmp_path: Path) -> None:
    """A folder that says tie_word_embeddings but stores a different head: transformers keeps the stored head.
    Control: a stored head equal to the embedding stays tied."""
    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False, **LLAMA)
    edit_config(tmp_path, tie_word_embeddings=True)
    assert not from_transformers(tmp_path)[1].tie_embeddings
    assert _diff(tmp_path) <= ATOL
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert from_transformers(tmp_path)[1].tie_embeddings


def test_classes_that_never_tie(tmp_path: Path) -> None:
    """Nemotron-H keeps its own head whatever tie_word_embeddings says."""
    build_source(tmp_path, "NemotronHForCausalLM", "NemotronHConfig", tie_word_embeddings=True,
                 layers_block_type=["mamba", "moe", "attention", "moe"], **NEMOTRON)
    assert not from_transformers(tmp_path)[1].tie_embeddings
    assert _diff(tmp_path) <= ATOL


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(QWEN_MOE, num_hidden_layers=2, shared_expert_intermediate_size=0)),
    ("NemotronHForCausalLM", "NemotronHConfig", dict(NEMOTRON, moe_shared_expert_intermediate_size=0,
                                                     layers_block_type=["mamba", "moe"])),
])
def test_zero_width_shared_experts(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    """Qwen2-MoE runs a zero-width shared expert (it adds nothing; its gate is never read); Nemotron-H reads a
    width of 0 as the dense MLP's."""
    build_source(tmp_path, cls, cfg_cls, **kw)
    assert _diff(tmp_path) <= ATOL


@pytest.mark.parametrize("cls,cfg_cls,kw,edit", [
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(NEXT, num_hidden_layers=4), {"layer_types": None}),
    ("BambaForCausalLM", "BambaConfig", dict(LLAMA, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                             mamba_n_groups=2, mamba_chunk_size=8), {"attn_layer_indices": None}),
    ("Lfm2ForCausalLM", "Lfm2Config", LFM2, {"block_ff_dim": 80, "block_auto_adjust_ff_dim": False}),
])
def test_settings_in_the_classes_own_older_forms(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any],
                                                 edit: dict[str, Any]) -> None:
    """Layer types the class derives (Qwen3-Next from full_attention_interval, Bamba from attn_layer_indices, null:
    all Mamba) and LFM2's legacy block_ff_dim, which wins over intermediate_size."""
    if "block_ff_dim" in edit:  # the weights of the legacy width
        kw = dict(kw, intermediate_size=edit["block_ff_dim"], block_auto_adjust_ff_dim=False)
    build_source(tmp_path, cls, cfg_cls, **kw)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(edit)
    if "block_ff_dim" in edit:
        conf["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if v is not None or k in (
        "attn_layer_indices",)}))
    assert _diff(tmp_path) <= ATOL


@pytest.mark.parametrize("cls,cfg_cls,kw,edit,message", [
    ("Lfm2ForCausalLM", "Lfm2Config", LFM2, {"block_multiple_of": 0}, "block_multiple_of must be a whole number"),
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(NEXT, num_hidden_layers=4), {"head_dim": None},
     "cannot read"),
])
def test_malformed_sizes_are_refused_in_one_line(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any],
                                                 edit: dict[str, Any], message: str) -> None:
    build_source(tmp_path, cls, cfg_cls, **kw)
    edit_config(tmp_path, **edit)
    with pytest.raises(CheckpointError, match=message) as info:
        from_transformers(tmp_path)
    assert "\n" not in str(info.value)


def test_gemma3_per_type_rope_without_a_theta(tmp_path: Path) -> None:
    """A per-layer-type rope_parameters entry without rope_theta takes the class's base for that type: 1e6 for the
    global layers, not the usual 1e4."""
    from test_import_norms import GEMMA3

    build_source(tmp_path, "Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA3)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["rope_parameters"]["full_attention"].pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path)[1].attention.rope_theta == 1e6
    assert _diff(tmp_path, LONG) <= ATOL


def test_qwen2_moe_windows_by_the_class_rule(tmp_path: Path) -> None:
    """Without layer_types Qwen2-MoE slides every other layer from the first, below max_window_layers; Qwen3-MoE
    slides every layer; OLMoE's mask is causal whatever sliding_window says."""
    kw = dict(QWEN_MOE, num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    build_source(tmp_path / "q2", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **kw)
    _drop(tmp_path / "q2", "layer_types")
    assert from_transformers(tmp_path / "q2")[1].pattern.split()[::2] == ["A.swa", "A", "A", "A"]
    assert _diff(tmp_path / "q2", LONG) <= ATOL
    build_source(tmp_path / "q3", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", **kw)
    assert from_transformers(tmp_path / "q3")[1].attention.window == 3
    assert _diff(tmp_path / "q3", LONG) <= ATOL
    build_source(tmp_path / "olmoe", "OlmoeForCausalLM", "OlmoeConfig", **dict(kw, pad_token_id=0, eos_token_id=1))
    assert from_transformers(tmp_path / "olmoe")[1].attention.window is None
    assert _diff(tmp_path / "olmoe", LONG) <= ATOL


def test_bamba_without_attention_layer_indices(tmp_path: Path) -> None:
    """A Bamba config that names no attention layers at all (the class's default): every layer Mamba."""
    build_source(tmp_path, "BambaForCausalLM", "BambaConfig", **dict(
        LLAMA, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8))
    _drop(tmp_path, "attn_layer_indices", "layers_block_type")
    assert from_transformers(tmp_path)[1].pattern == "MEME"
    assert _diff(tmp_path) <= ATOL


def test_nemotron_h_inner_width_is_heads_times_head_dim(tmp_path: Path) -> None:
    """Nemotron-H's Mamba width is mamba_num_heads x mamba_head_dim whatever expand says (Nemotron Nano 2: 128 x 80
    at width 4480): here 48 at width 32, ``mamba.d_inner``; it round trips through export too."""
    from test_import import export_round_trip

    build_source(tmp_path / "src", "NemotronHForCausalLM", "NemotronHConfig",
                 **dict(NEMOTRON, mamba_head_dim=12, layers_block_type=["mamba", "moe", "attention", "mamba"]))
    model, cfg = from_transformers(tmp_path / "src")
    assert cfg.mamba.d_inner == 48
    assert _diff(tmp_path / "src") <= ATOL
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL


def test_aliases_are_read_before_defaults(tmp_path: Path) -> None:
    """A setting spelled by its alias (the class's attribute_map) is not hidden by the default of its kept name:
    Mixtral's num_experts, RecurrentGemma's sliding_window."""
    build_source(tmp_path / "mixtral", "MixtralForCausalLM", "MixtralConfig", **dict(LLAMA, num_local_experts=4))
    conf = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    conf["num_experts"] = conf.pop("num_local_experts")
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path / "mixtral")[1].moe.n_experts == 4
    assert _diff(tmp_path / "mixtral") <= ATOL
    build_source(tmp_path / "rg", "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", hidden_size=32,
                 intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                 attention_window_size=5, block_types=["recurrent", "recurrent", "attention"])
    conf = json.loads((tmp_path / "rg" / "config.json").read_text())
    conf.pop("attention_window_size")
    conf["sliding_window"] = 5
    (tmp_path / "rg" / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path / "rg")[1].attention.window == 5
    assert _diff(tmp_path / "rg", LONG) <= ATOL


def test_nemotron_h_legacy_mamba_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nemotron-H configs written with the older mamba_* names (mamba_n_groups, mamba_d_conv, ...): the class still
    reads them, over the current names. Control: without that table the import is refused or computes another
    function."""
    build_source(tmp_path, "NemotronHForCausalLM", "NemotronHConfig", conv_kernel=3,
                 **dict(NEMOTRON, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"]))
    conf = json.loads((tmp_path / "config.json").read_text())
    for old, new in (("mamba_n_groups", "n_groups"), ("mamba_d_conv", "conv_kernel"),
                     ("mamba_chunk_size", "chunk_size")):
        conf[old] = conf.pop(new)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert_same_function(_loaded(tmp_path), tmp_path, ATOL)
    monkeypatch.setattr(source_mod, "LEGACY", {})
    with pytest.raises(InputError, match=r"n_groups \(8\)"):
        from_transformers(tmp_path)  # the class's default of 8 groups does not fit 4 heads


def test_aliases_are_the_classes() -> None:
    from amer.interop import supported_classes
    from amer.interop.defaults import ALIASES

    for arch in supported_classes():
        assert ALIASES.get(arch, {}) == dict(getattr(transformers, arch).config_class.attribute_map), arch


def test_qwen2_window_layers_default_and_bamba_partial_factor(tmp_path: Path) -> None:
    """Qwen2 without max_window_layers slides from layer 28 on (its class default); Bamba's rotary fraction is
    rope_parameters' or 0.5, whatever a top-level partial_rotary_factor says."""
    kw = dict(LLAMA, num_hidden_layers=30, hidden_size=16, intermediate_size=16, num_attention_heads=2,
              num_key_value_heads=1)
    build_source(tmp_path / "q2", "Qwen2ForCausalLM", "Qwen2Config", use_sliding_window=True, sliding_window=3,
                 max_window_layers=28, **kw)
    _drop(tmp_path / "q2", "layer_types", "max_window_layers")
    assert from_transformers(tmp_path / "q2")[1].pattern.split()[::2][27:] == ["A", "A.swa", "A.swa"]
    assert _diff(tmp_path / "q2", LONG) <= ATOL
    build_source(tmp_path / "bamba", "BambaForCausalLM", "BambaConfig", **dict(
        LLAMA, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8,
        attn_layer_indices=[1]))
    conf = json.loads((tmp_path / "bamba" / "config.json").read_text())
    conf["rope_parameters"].pop("partial_rotary_factor", None)
    conf["partial_rotary_factor"] = 1.0
    (tmp_path / "bamba" / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path / "bamba")[1].attention.rope_fraction == 0.5
    assert _diff(tmp_path / "bamba") <= ATOL
