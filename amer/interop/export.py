"""amer -> transformers: write a model whose pattern a transformers class can express as that class's folder.

``(AE)*L`` with one-expert E blocks is ``LlamaForCausalLM`` (``MistralForCausalLM`` with a sliding window,
``Qwen3ForCausalLM`` with q/k norms, ``Phi3ForCausalLM`` with partial RoPE), with routed experts
``MixtralForCausalLM``; ``M*L`` is
``Mamba2ForCausalLM``; with sandwich norms ``(AE)*L`` is ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``, with post
norms ``Olmo2ForCausalLM`` (:mod:`amer.interop.export_norms`); ``D E`` layers (multi-head latent attention) are
``DeepseekV3ForCausalLM``, KDA and position-free MLA layers ``KimiLinearForCausalLM``
(:mod:`amer.interop.export_latent`), lightning attention layers ``MiniMaxForCausalLM``
(:mod:`amer.interop.export_minimax`), parallel ``[AM]E`` layers ``FalconH1ForCausalLM``
(:mod:`amer.interop.export_falcon`), Griffin's ``RE`` / ``AE`` layers ``RecurrentGemmaForCausalLM``
(:mod:`amer.interop.export_griffin`), ``M`` / ``H`` and ``S`` / ``H`` layers (shared hybrid transformers)
``Zamba2ForCausalLM`` and ``ZambaForCausalLM`` (:mod:`amer.interop.export_zamba`). Patterns with MoE layers and
the hybrids around them (Jamba, Qwen3-Next, Granite-4.0-H, Qwen2/3-MoE, OLMoE, LFM2-MoE) are written by
:mod:`amer.interop.export_moe`; the dense hybrid and
state-space classes (Mamba, Falcon-Mamba, LFM2, OLMo-Hybrid, Granite, Qwen2/3 with per-layer windows) by
:mod:`amer.interop.export_zoo`. The folder is config.json + model.safetensors (+ tokenizer.json), written whole
into a temporary sibling and renamed into place; the ``transformers`` package is not needed to write it. Anything
the target class cannot express (another pattern, a model or family option off its default) is an
:class:`~amer.errors.InputError` naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from amer.config import ModelConfig
from amer.errors import InputError
from amer.fileio import atomic_write_text, json_text, refuse_link
from amer.fileread import json_loads, read_file
from amer.hub import write_folder
from amer.interop.export_falcon import falcon_export, falcon_target
from amer.interop.export_griffin import griffin_export, griffin_target
from amer.interop.export_latent import latent_export, latent_target
from amer.interop.export_minimax import minimax_export, minimax_target
from amer.interop.export_moe import moe_export, moe_target
from amer.interop.export_norms import norm_export, norm_target
from amer.interop.export_parts import (
    ROPE_SCALING,
    dense_out,
    mamba2_out,
    moe_plain,
    plain,
    refuse,
    rope_parameters,
    shared,
)
from amer.interop.export_zamba import zamba_export, zamba_target
from amer.interop.export_zoo import zoo_export, zoo_target
from amer.weights import save_tensors

__all__ = ["export_transformers", "EXPORT_FILES"]

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# the attention options the Llama, Mistral, Qwen3 and Mixtral classes express (which of them: _target)
LLAMA_ATTENTION = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "window", "qk_norm", "qkv_bias", "out_bias",
                   *ROPE_SCALING)
_MARK = "amer_exported"


def _target(cfg: ModelConfig) -> str:
    letters = cfg.parsed.letters.replace("|", "")
    L = len(letters)
    if letters == "M" * L:
        return "Mamba2ForCausalLM"
    if L % 2 == 0 and letters == "AE" * (L // 2):
        a, moe = cfg.attention, cfg.moe
        # partial RoPE: Phi-3, the one Llama-style class with it (q/k norms are Qwen3's: that class names the fraction)
        if a.rope_fraction != 1.0 and moe.n_experts == 1 and not a.qk_norm:
            # its rope_type is default or longrope (which amer has not): no linear or Llama 3.1 scaling
            plain(a, "attention", "Phi3ForCausalLM", ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "window",
                                                      "rope_fraction"))
            moe_plain(moe, "moe", "Phi3ForCausalLM", ("n_experts", "d_ff"))
            return "Phi3ForCausalLM"
        # every other attention option (an output gate, a soft cap, a scale, projection-wide q/k norms...) has no
        # counterpart in these classes
        plain(a, "attention", "the Llama, Mistral, Qwen3 and Mixtral classes", LLAMA_ATTENTION)
        if a.qkv_bias != a.out_bias:
            raise refuse("qkv_bias equal to out_bias for Llama-style attention (q/k/v biases alone: Qwen2)")
        if moe.n_experts > 1:
            moe_plain(moe, "moe", "MixtralForCausalLM", ("n_experts", "top_k", "d_ff", "renormalize_top1"))
            if (moe.top_k < 2 and not moe.renormalize_top1) or a.qk_norm or a.qkv_bias:
                raise refuse("MixtralForCausalLM renormalises top-1 weights to 1 (set moe.renormalize_top1) "
                              "and has no q/k norm and no attention biases")
            return "MixtralForCausalLM"
        moe_plain(moe, "moe", "the Llama, Mistral and Qwen3 classes", ("n_experts", "d_ff", "bias"))
        if moe.bias and (a.qk_norm or a.window is not None):
            raise refuse("moe.bias with q/k norms or a sliding window: of the Llama, Mistral and Qwen3 classes only "
                          "Llama has MLP biases (mlp_bias)")
        if a.qk_norm:  # with a window too: Qwen3 with every layer sliding (amer.interop.export_zoo)
            return "Qwen3ForCausalLM"
        if a.window is not None and a.qkv_bias:
            raise refuse("MistralForCausalLM (sliding-window attention) has no attention biases")
        return "MistralForCausalLM" if a.window is not None else "LlamaForCausalLM"
    raise refuse(f"pattern {cfg.pattern!r}: transformers classes express '(AE)*L' (Llama, Mistral, Qwen3, Phi-3, "
                  "Mixtral, Granite; 'A.swa E' layers: Qwen2/3), 'M' or 'S' repeated (Mamba2, Mamba, Falcon-Mamba), "
                  "'CE' / 'AE' layers (LFM2), 'G E' / 'A E.post' layers (OLMo-Hybrid) or 'RE' / 'AE' layers "
                  "(RecurrentGemma)")


def _llama(model: Any, cfg: ModelConfig, arch: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    a, moe = cfg.attention, cfg.moe
    hd = a.head_dim or cfg.d_model // a.n_heads
    L = cfg.n_layers // 2
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen3ForCausalLM": "qwen3",
                  "MixtralForCausalLM": "mixtral", "Phi3ForCausalLM": "phi3"}[arch]
    conf = {"architectures": [arch], "model_type": model_type, "hidden_size": cfg.d_model, "num_hidden_layers": L,
            "intermediate_size": moe.d_ff or 2 * cfg.d_model, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "head_dim": hd, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope_parameters(a), "rope_theta": a.rope_theta,
            "attention_bias": a.qkv_bias, "hidden_act": "silu", "sliding_window": a.window,
            "max_position_embeddings": cfg.max_seq_len}
    if arch == "LlamaForCausalLM":
        conf["mlp_bias"] = moe.bias
    if arch == "Phi3ForCausalLM":
        conf["rope_parameters"]["partial_rotary_factor"] = a.rope_fraction
    if arch == "MixtralForCausalLM":
        conf.update(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                    router_aux_loss_coef=moe.aux_loss_coef)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(L):
        pre, A, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[A + "norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[E + "norm.weight"]
        sizes = [a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd]
        if arch == "Phi3ForCausalLM":  # fused as amer holds them: q, k, v rows; gate, up rows
            out[pre + "self_attn.qkv_proj.weight"] = sd[A + "mixer.qkv.weight"]
            out[pre + "self_attn.o_proj.weight"] = sd[A + "mixer.out_proj.weight"]
            out[pre + "mlp.gate_up_proj.weight"] = sd[E + "mixer.w_gate_up"][0].T
            out[pre + "mlp.down_proj.weight"] = sd[E + "mixer.w_down"][0].T
            continue
        for n, w in zip("qkv", sd[A + "mixer.qkv.weight"].split(sizes)):
            out[f"{pre}self_attn.{n}_proj.weight"] = w
        if a.qkv_bias:
            for n, b in zip("qkv", sd[A + "mixer.qkv.bias"].split(sizes)):
                out[f"{pre}self_attn.{n}_proj.bias"] = b
            out[pre + "self_attn.o_proj.bias"] = sd[A + "mixer.out_proj.bias"]
        out[pre + "self_attn.o_proj.weight"] = sd[A + "mixer.out_proj.weight"]
        if a.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = sd[A + "mixer.q_norm.weight"]
            out[pre + "self_attn.k_norm.weight"] = sd[A + "mixer.k_norm.weight"]
        gu, dn = sd[E + "mixer.w_gate_up"], sd[E + "mixer.w_down"]  # (E, D, 2F), (E, F, D)
        F_ = dn.shape[1]
        if arch == "MixtralForCausalLM":
            out[pre + "block_sparse_moe.gate.weight"] = sd[E + "mixer.router.weight"]
            for e in range(moe.n_experts):
                ex = f"{pre}block_sparse_moe.experts.{e}."
                out[ex + "w1.weight"], out[ex + "w3.weight"] = gu[e, :, :F_].T, gu[e, :, F_:].T
                out[ex + "w2.weight"] = dn[e].T
        else:
            dense_out(sd, E, pre + "mlp.", out)
    return conf, out


def _mamba2(model: Any, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    m = cfg.mamba
    plain(m, "mamba", "Mamba2ForCausalLM", ("d_state", "d_conv", "expand", "head_dim", "n_groups", "bias"))
    d_inner = m.expand * cfg.d_model
    conf = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "state_size": m.d_state, "expand": m.expand, "head_dim": m.head_dim,
            "num_heads": d_inner // m.head_dim, "n_groups": m.n_groups, "conv_kernel": m.d_conv,
            "chunk_size": m.chunk_size, "use_bias": m.bias, "use_conv_bias": True, "layer_norm_epsilon": cfg.norm_eps,
            "rms_norm": True, "hidden_act": "silu", "residual_in_fp32": True}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        pre, M = f"backbone.layers.{i}.", f"blocks.{i}."
        out[pre + "norm.weight"] = sd[M + "norm.weight"]
        mamba2_out(sd, M + "mixer.", pre + "mixer.", out)
    return conf, out


def check_target(directory: Path) -> None:
    """Refuse a folder an export must not replace: a link, a file, or one holding anything amer did not export."""
    refuse_link(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory: choose a new or empty folder")
    if directory.is_dir() and any(directory.iterdir()):
        names = sorted(p.name for p in directory.iterdir())
        ours = False
        try:
            ours = json_loads(read_file(directory / "config.json")).get(_MARK) is not None
        except (OSError, ValueError, AttributeError):
            pass
        if not ours or any(n not in EXPORT_FILES for n in names):
            raise InputError(f"{directory} holds files amer did not export ({', '.join(names[:3])}): choose a new "
                             "or empty folder")


def _special_ids(tokenizer: Any, vocab_size: int) -> dict[str, int | None]:
    """bos / eos / pad ids for config.json: the tokenizer's, each inside the model's vocabulary; without a tokenizer
    none at all, written as null so the class's own defaults (ids of some other vocabulary) do not apply."""
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_id", None) if tokenizer is not None else None
           for k in ("bos", "eos", "pad")}
    for key, i in ids.items():
        if i is not None and not 0 <= i < vocab_size:
            raise refuse(f"the tokenizer's {key.split('_')[0]} id {i} is outside the model's vocabulary of "
                          f"{vocab_size}: the tokenizer is not this model's")
    return ids


def _check_blocks(cfg: ModelConfig, target: str = "the Llama, Mixtral and Mamba2 classes") -> None:
    """Pre-norm blocks with the plain residual, as ``target`` has them."""
    for layer in cfg.parsed.layers:
        opts = cfg.block_options(layer)
        for f in dataclasses.fields(opts):
            if getattr(opts, f.name) != f.default:
                raise refuse(f"{layer.key} has the block option {f.name}={getattr(opts, f.name)!r}, which "
                              f"{target} lacks (needs {f.default!r})")


def export_transformers(model: Any, cfg: ModelConfig, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (a :class:`~amer.model.HybridLM` of config ``cfg``) as a transformers model folder."""
    # which class: the families and options decide (parallel layers and MLA or KDA first: their hybrids are theirs
    # alone; the zoo's before the norm placements: OLMo-Hybrid mixes pre-norm DeltaNet layers with post-norm
    # attention layers)
    share = next((layer for layer in cfg.parsed.layers if layer.share is not None), None)
    if (arch := zamba_target(cfg)) is not None:  # hybrid layers, their transformers shared: Zamba, Zamba2
        conf, tensors = zamba_export(model, cfg, arch)
    elif share is not None:
        raise refuse(f"the shared block {share.written} (block {share.index}): of the transformers classes only "
                      "Zamba and Zamba2 reuse a block's weights, their hybrid layers' (H)")
    elif (arch := falcon_target(cfg)) is not None:  # parallel layers: Falcon-H1
        conf, tensors = falcon_export(model, cfg)
    elif (arch := latent_target(cfg)) is not None:  # DeepSeek-V3, Kimi Linear
        shared(cfg, arch)
        _check_blocks(cfg, arch)
        conf, tensors = latent_export(model, cfg, arch)
    elif (arch := griffin_target(cfg)) is not None:  # recurrent and local-attention layers: RecurrentGemma
        conf, tensors = griffin_export(model, cfg)
    elif (arch := moe_target(cfg)) is not None:  # MoE and its hybrids: Jamba, Qwen3-Next, Granite-4.0-H, Qwen-MoE...
        conf, tensors = moe_export(model, cfg, arch)
    elif (arch := zoo_target(cfg)) is not None:  # Mamba-1, LFM2, OLMo-Hybrid, Granite, Qwen with per-layer windows
        conf, tensors = zoo_export(model, cfg, arch)
    elif (arch := norm_target(cfg)) is not None:  # Gemma 2 / 3 and OLMo 2, by where the blocks' norms sit
        conf, tensors = norm_export(model, cfg, arch)
    elif (arch := minimax_target(cfg)) is not None:  # lightning attention, MiniMax's post-norm residual factors
        shared(cfg, arch)
        conf, tensors = minimax_export(model, cfg)
    else:  # the pattern first: a pattern no class takes is the refusal to name, before any option
        arch = _target(cfg)
        shared(cfg, arch)
        _check_blocks(cfg, arch)
        conf, tensors = _mamba2(model, cfg) if arch == "Mamba2ForCausalLM" else _llama(model, cfg, arch)
    conf.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype="float32")
    conf.update(_special_ids(tokenizer, cfg.vocab_size))
    conf[_MARK] = {"pattern": cfg.pattern}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.detach()
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise refuse(f"{name} has non-finite values")
    directory = Path(directory)
    check_target(directory)

    def write(tmp: Path) -> None:
        save_tensors({k: v.float().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
                     metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        atomic_write_text(tmp / "config.json", json_text(conf))

    write_folder(directory, EXPORT_FILES, write)
    return directory
