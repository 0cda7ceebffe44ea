"""amer -> transformers for the zoo's hybrid and state-space classes: ``S*L`` as ``MambaForCausalLM`` (or
``FalconMambaForCausalLM`` with weightless dt/B/C norms), ``CE``/``AE`` layers as ``Lfm2ForCausalLM``, ``G E`` /
``A E.post`` layers as ``OlmoHybridForCausalLM``, ``(AE)*L`` with multipliers as ``GraniteForCausalLM`` and ``AE`` /
``A.swa E`` layers as ``Qwen3ForCausalLM`` (``Qwen2ForCausalLM`` with q/k/v biases) with per-layer ``layer_types``.

Each writer is the inverse of its converter in :mod:`amer.interop`, and every setting it cannot write is refused by
name: a family's fields are compared with the family's defaults, so an option the target class has no counterpart
for (including options added to a family later) is an error, never silently dropped. Fields that only shape
initialisation or the training scan's blocking (``dt_min``, ``chunk_size``...) do not change the function and pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from amer.config import ModelConfig
from amer.errors import InputError

__all__ = ["zoo_target", "zoo_export", "ZOO_TARGETS"]

Tensors = dict[str, Tensor]
ZOO_TARGETS = ("MambaForCausalLM", "FalconMambaForCausalLM", "Lfm2ForCausalLM", "OlmoHybridForCausalLM",
               "GraniteForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM")
# fields that shape the initialisation or the blocking of a training scan, not the function a model computes
_NOT_FUNCTION = {"dt_min", "dt_max", "dt_init_floor", "dt_scale", "dt_init", "chunk_size", "a_init_range",
                 "aux_loss_coef", "z_loss_coef"}
_SHARED_DEFAULTS = (("embed_scale", 1.0), ("residual_scale", 1.0), ("logit_scale", 1.0), ("logit_softcap", None),
                    ("norm_offset", 0.0))


def _refuse(what: str) -> InputError:
    return InputError(f"cannot export as a transformers model: {what}")


def _plain(obj: Any, where: str, target: str, allowed: Iterable[str] = ()) -> None:
    """Every field of config ``obj`` outside ``allowed`` (and the non-function ones) at its default."""
    default, allowed = type(obj)(), set(allowed) | _NOT_FUNCTION
    for f in dataclasses.fields(obj):
        if f.name not in allowed and getattr(obj, f.name) != getattr(default, f.name):
            raise _refuse(f"{where}.{f.name}={getattr(obj, f.name)!r} has no counterpart in {target} (needs "
                          f"{getattr(default, f.name)!r})")


def _shared(cfg: ModelConfig, target: str, allowed: Iterable[str] = ()) -> None:
    for name, default in _SHARED_DEFAULTS:
        if name not in allowed and getattr(cfg, name) != default:
            raise _refuse(f"model.{name}={getattr(cfg, name)!r} has no counterpart in {target} (needs {default!r})")


def _layers(cfg: ModelConfig) -> list[str]:
    """Each layer's key (``A``, ``A.swa``, ``E.post``...), pipeline-stage marks dropped."""
    return [layer.key for layer in cfg.parsed.layers]


def _pairs(keys: list[str]) -> list[tuple[str, str]] | None:
    if len(keys) % 2:
        return None
    return list(zip(keys[::2], keys[1::2]))


def _placement(cfg: ModelConfig, want: dict[str, str], target: str, variants: Iterable[str] = ()) -> None:
    """Each layer's norm placement as ``want`` (layer key -> placement) says, and no variants but ``variants`` (layer
    keys such as ``A.swa``, whose writers check them)."""
    for layer in cfg.parsed.layers:
        if layer.variant is not None and layer.key not in variants:
            raise _refuse(f"{layer.key} (layer {layer.index}): {target} has one config per block kind, no variants")
        got = cfg.block_options(layer).norm_placement
        if got != want.get(layer.key, "pre"):
            raise _refuse(f"{layer.key} (layer {layer.index}) has norm_placement {got!r}; {target} places it "
                          f"{want.get(layer.key, 'pre')!r}")


def zoo_target(cfg: ModelConfig) -> str | None:
    """The zoo class whose layer layout ``cfg``'s pattern has, or None (the Llama / Mixtral / Mamba2 writers, or a
    refusal, decide then). Layers are matched by family; each writer then checks variants and norm placements."""
    layers = cfg.parsed.layers
    letters = [str(layer.family) for layer in layers]
    if letters and set(letters) == {"S"}:
        return "FalconMambaForCausalLM" if cfg.mamba1.dt_bc_norm == "weightless" else "MambaForCausalLM"
    pairs = _pairs(letters)
    if not pairs or any(b != "E" for _, b in pairs):
        return None
    mixers = {a for a, _ in pairs}
    if "C" in mixers and mixers <= {"A", "C"}:
        return "Lfm2ForCausalLM"
    if "G" in mixers and mixers <= {"A", "G"}:
        return "OlmoHybridForCausalLM"
    if mixers == {"A"}:
        if any(cfg.block_options(layer).norm_placement != "pre" for layer in layers):
            return None  # Gemma 2 / 3, OLMo 2 (amer.interop.export_norms) or a refusal
        variants = any(layer.variant is not None for layer in layers if str(layer.family) == "A")
        if variants or (cfg.attention.qk_norm and cfg.attention.window is not None):
            return "Qwen3ForCausalLM" if cfg.attention.qk_norm else "Qwen2ForCausalLM"
        granite = any(getattr(cfg, n) != d for n, d in _SHARED_DEFAULTS[:3]) or cfg.attention.scale is not None
        return "GraniteForCausalLM" if granite else None
    return None


def zoo_export(model: Any, cfg: ModelConfig, arch: str) -> tuple[dict[str, Any], Tensors]:
    """(config.json contents, tensors in the class's names) of ``model`` as ``arch``, one of :data:`ZOO_TARGETS`."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    writer: Callable[[ModelConfig, Tensors, str], tuple[dict[str, Any], Tensors]] = {
        "MambaForCausalLM": _mamba1, "FalconMambaForCausalLM": _mamba1, "Lfm2ForCausalLM": _lfm2,
        "OlmoHybridForCausalLM": _olmo_hybrid, "GraniteForCausalLM": _decoder, "Qwen3ForCausalLM": _decoder,
        "Qwen2ForCausalLM": _decoder}[arch]
    return writer(cfg, sd, arch)


def _mamba1(cfg: ModelConfig, sd: Tensors, arch: str) -> tuple[dict[str, Any], Tensors]:
    s = cfg.mamba1
    falcon = arch == "FalconMambaForCausalLM"
    _shared(cfg, arch)
    _placement(cfg, {}, arch)
    _plain(s, "mamba1", arch, ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias")
           + (("dt_bc_norm", "dt_bc_norm_eps") if falcon else ()))
    conf: dict[str, Any] = {
        "architectures": [arch], "model_type": "falcon_mamba" if falcon else "mamba", "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "state_size": s.d_state, "expand": s.expand, "conv_kernel": s.d_conv,
        "time_step_rank": s.rank(cfg.d_model), "use_bias": s.bias, "use_conv_bias": s.conv_bias,
        "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": True,
        "max_position_embeddings": cfg.max_seq_len}
    if falcon:
        conf["mixer_rms_eps"] = s.dt_bc_norm_eps
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        pre, blk = f"backbone.layers.{i}.", f"blocks.{i}."
        out[pre + "norm.weight"] = sd[blk + "norm.weight"]
        _mamba1_mixer(sd, blk + "mixer.", pre + "mixer.", out)
    return conf, out


def _mamba1_mixer(sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)
    if src + "conv_bias" in sd:
        out[dst + "conv1d.bias"] = sd[src + "conv_bias"]
    for name in ("in_proj.weight", "in_proj.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                 "out_proj.weight", "out_proj.bias"):
        if src + name in sd:
            out[dst + name] = sd[src + name]


def _dense_ffn(cfg: ModelConfig, variant: str | None, arch: str) -> int:
    """The E blocks' width, after checking they are the plain dense SwiGLU the target has."""
    moe = cfg.family_config("E", variant)
    where = "moe" if variant is None else f"moe.variants.{variant}"
    _require(moe.n_experts == 1, f"{where}.n_experts={moe.n_experts}: {arch}'s feed-forward is one dense SwiGLU")
    _plain(moe, where, arch, ("n_experts", "d_ff", "top_k", "dispatch", "capacity_factor", "capacity_block",
                              "renormalize_top1"))
    return moe.d_ff or 2 * cfg.d_model


def _attention_conf(cfg: ModelConfig, arch: str, allowed: Iterable[str]) -> dict[str, Any]:
    a = cfg.attention
    _plain(a, "attention", arch, {"n_heads", "n_kv_heads", "head_dim", "rope_theta"} | set(allowed))
    hd = a.head_dim or cfg.d_model // a.n_heads
    return {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": hd,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}}


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _refuse(what)


def _split_qkv(cfg: ModelConfig, sd: Tensors, blk: str, pre: str, out: Tensors, out_name: str = "o_proj") -> None:
    a = cfg.attention
    hd = a.head_dim or cfg.d_model // a.n_heads
    sizes = [a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd]
    for n, w in zip("qkv", sd[blk + "mixer.qkv.weight"].split(sizes)):
        out[f"{pre}{n}_proj.weight"] = w
    if blk + "mixer.qkv.bias" in sd:
        for n, b in zip("qkv", sd[blk + "mixer.qkv.bias"].split(sizes)):
            out[f"{pre}{n}_proj.bias"] = b
    out[f"{pre}{out_name}.weight"] = sd[blk + "mixer.out_proj.weight"]
    if blk + "mixer.out_proj.bias" in sd:
        out[f"{pre}{out_name}.bias"] = sd[blk + "mixer.out_proj.bias"]


def _swiglu(sd: Tensors, blk: str, pre: str, out: Tensors, names: tuple[str, str, str]) -> None:
    gu, dn = sd[blk + "mixer.w_gate_up"][0], sd[blk + "mixer.w_down"][0]  # (D, 2F), (F, D)
    F_ = dn.shape[0]
    out[pre + names[0] + ".weight"], out[pre + names[1] + ".weight"] = gu[:, :F_].T, gu[:, F_:].T
    out[pre + names[2] + ".weight"] = dn.T


def _lfm2(cfg: ModelConfig, sd: Tensors, arch: str) -> tuple[dict[str, Any], Tensors]:
    _shared(cfg, arch)
    _placement(cfg, {}, arch)
    pairs = _pairs(_layers(cfg)) or []
    a, sc = cfg.attention, cfg.shortconv
    if "A" in {x for x, _ in pairs}:
        _require(a.qk_norm and a.qk_norm_scope == "head", "LFM2's attention normalises q and k per head "
                 "(attention.qk_norm true, qk_norm_scope 'head')")
        _require(a.head_dim in (None, cfg.d_model // a.n_heads), "LFM2's attention heads are hidden_size / heads wide "
                 "(attention.head_dim unset)")
    conf = {"architectures": [arch], "model_type": "lfm2", "hidden_size": cfg.d_model,
            "num_hidden_layers": len(pairs), "intermediate_size": _dense_ffn(cfg, None, arch),
            "block_auto_adjust_ff_dim": False, "conv_bias": sc.bias, "conv_L_cache": sc.l_cache,
            "norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
            "layer_types": ["conv" if x == "C" else "full_attention" for x, _ in pairs],
            **_attention_conf(cfg, arch, {"qk_norm", "head_dim"})}
    conf.pop("head_dim")
    _plain(sc, "shortconv", arch, ("l_cache", "bias"))
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.embedding_norm.weight": sd["norm.weight"]}
    for i, (x, _) in enumerate(pairs):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "operator_norm.weight"] = sd[mix + "norm.weight"]
        if x == "A":
            _split_qkv(cfg, sd, mix, pre + "self_attn.", out, out_name="out_proj")
            out[pre + "self_attn.q_layernorm.weight"] = sd[mix + "mixer.q_norm.weight"]
            out[pre + "self_attn.k_layernorm.weight"] = sd[mix + "mixer.k_norm.weight"]
        else:
            conv = pre + "conv."
            out[conv + "conv.weight"] = sd[mix + "mixer.conv_weight"].unsqueeze(1)
            for name in ("in_proj.weight", "out_proj.weight", "in_proj.bias", "out_proj.bias"):
                if mix + "mixer." + name in sd:
                    out[conv + name] = sd[mix + "mixer." + name]
            if mix + "mixer.conv_bias" in sd:
                out[conv + "conv.bias"] = sd[mix + "mixer.conv_bias"]
        out[pre + "ffn_norm.weight"] = sd[ffn + "norm.weight"]
        _swiglu(sd, ffn, pre + "feed_forward.", out, ("w1", "w3", "w2"))
    return conf, out


def _olmo_hybrid(cfg: ModelConfig, sd: Tensors, arch: str) -> tuple[dict[str, Any], Tensors]:
    _shared(cfg, arch)
    _placement(cfg, {"A": "post", "E.post": "post"}, arch, ("E.post",))
    pairs = _pairs(_layers(cfg)) or []
    a, g = cfg.attention, cfg.deltanet
    _require("A" in {x for x, _ in pairs}, f"{arch} needs at least one attention layer ('A E.post')")
    _require(all(p in (("G", "E"), ("A", "E.post")) for p in pairs), f"{arch}'s layers are 'G E' (pre-norm) and "
             "'A E.post' (post-norm, its feed-forward the E variant 'post')")
    _require(a.qk_norm and a.qk_norm_scope == "projection", "OLMo-Hybrid's attention normalises the whole q and k "
             "projections (attention.qk_norm true, qk_norm_scope 'projection')")
    _require(a.rope_fraction in (0.0, 1.0), "OLMo-Hybrid's attention rotates whole heads or none (attention."
             "rope_fraction 1 or 0)")
    _require(a.qkv_bias == a.out_bias, "OLMo-Hybrid's attention_bias sets the q/k/v and output biases together")
    _require(a.head_dim in (None, cfg.d_model // a.n_heads), "OLMo-Hybrid's attention heads are hidden_size / heads "
             "wide (attention.head_dim unset)")
    _require(g.norm_eps == 1e-5, "OLMo-Hybrid's DeltaNet output norm has epsilon 1e-5 (deltanet.norm_eps 1e-5)")
    _plain(g, "deltanet", arch, ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "allow_neg_eigval",
                                 "norm_eps"))
    d_ff = _dense_ffn(cfg, None, arch)
    _require(_dense_ffn(cfg, "post", arch) == d_ff, "the E and E.post blocks must have one width (one MLP config)")
    attn = _attention_conf(cfg, arch, {"qk_norm", "qk_norm_scope", "rope_fraction", "qkv_bias", "out_bias",
                                       "head_dim"})
    attn.pop("head_dim")
    if a.rope_fraction == 0:
        attn["rope_parameters"] = {"rope_type": "default", "rope_theta": None}  # no RoPE (the released checkpoints)
    dk = g.head_k_dim or cfg.d_model // g.n_k_heads
    conf = {"architectures": [arch], "model_type": "olmo_hybrid", "hidden_size": cfg.d_model,
            "num_hidden_layers": len(pairs), "intermediate_size": d_ff, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "attention_bias": a.qkv_bias,
            "layer_types": ["linear_attention" if x == "G" else "full_attention" for x, _ in pairs],
            "linear_num_key_heads": g.n_k_heads, "linear_num_value_heads": g.n_v_heads or g.n_k_heads,
            "linear_key_head_dim": dk, "linear_value_head_dim": g.head_v_dim or dk,
            "linear_conv_kernel_dim": g.d_conv, "linear_allow_neg_eigval": g.allow_neg_eigval, **attn}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    H, dv = g.n_v_heads or g.n_k_heads, g.head_v_dim or dk
    for i, (x, _) in enumerate(pairs):  # the checkpoints' own names (transformers renames them on loading)
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        if x == "G":
            out[pre + "attention_layer_norm.weight"] = sd[mix + "norm.weight"]
            out[pre + "feedforward_layer_norm.weight"] = sd[ffn + "norm.weight"]
            la, m = pre + "linear_attn.", mix + "mixer."
            sizes = [g.n_k_heads * dk, g.n_k_heads * dk, H * dv, H * dv, H, H]
            for n, w in zip("qkvgba", sd[m + "in_proj.weight"].split(sizes)):
                out[f"{la}{n}_proj.weight"] = w
            for n, w in zip("qkv", sd[m + "conv_weight"].unsqueeze(1).split(sizes[:3])):
                out[f"{la}{n}_conv1d.weight"] = w
            out[la + "A_log"], out[la + "dt_bias"] = sd[m + "A_log"], sd[m + "dt_bias"]
            out[la + "o_norm.weight"], out[la + "o_proj.weight"] = sd[m + "norm_weight"], sd[m + "out_proj.weight"]
        else:
            _split_qkv(cfg, sd, mix, pre + "self_attn.", out)
            out[pre + "self_attn.q_norm.weight"] = sd[mix + "mixer.q_norm.weight"]
            out[pre + "self_attn.k_norm.weight"] = sd[mix + "mixer.k_norm.weight"]
            out[pre + "feedforward_layer_norm.weight"] = sd[mix + "post_norm.weight"]
            out[pre + "post_feedforward_layernorm.weight"] = sd[ffn + "post_norm.weight"]
        _swiglu(sd, ffn, pre + "mlp.", out, ("gate_proj", "up_proj", "down_proj"))
    return conf, out


def _decoder(cfg: ModelConfig, sd: Tensors, arch: str) -> tuple[dict[str, Any], Tensors]:
    """Granite ((AE)*L with multipliers), Qwen3 / Qwen2 (AE and A.swa E layers, per-layer windows)."""
    a = cfg.attention
    granite = arch == "GraniteForCausalLM"
    _shared(cfg, arch, ("embed_scale", "residual_scale", "logit_scale") if granite else ())
    _placement(cfg, {}, arch, () if granite else ("A.swa",))
    pairs = _pairs(_layers(cfg)) or []
    allowed = {"qkv_bias", "out_bias", "window"} | ({"scale"} if granite else {"qk_norm"})
    conf = {"architectures": [arch], "hidden_size": cfg.d_model, "num_hidden_layers": len(pairs),
            "intermediate_size": _dense_ffn(cfg, None, arch), "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, **_attention_conf(cfg, arch, allowed)}
    if arch == "Qwen2ForCausalLM":
        _require(a.qkv_bias and not a.out_bias, "Qwen2's attention has q/k/v biases and no output bias")
    else:
        _require(a.qkv_bias == a.out_bias, f"{arch}'s attention_bias sets the q/k/v and output biases together")
        conf["attention_bias"] = a.qkv_bias
    _require(a.head_dim in (None, cfg.d_model // a.n_heads) or arch == "Qwen3ForCausalLM",
             f"{arch}'s attention heads are hidden_size / heads wide (attention.head_dim unset)")
    if granite:
        _require(a.window is None, "Granite's attention sees the whole causal past (attention.window unset)")
        hd = a.head_dim or cfg.d_model // a.n_heads
        conf.update(model_type="granite", embedding_multiplier=cfg.embed_scale, residual_multiplier=cfg.residual_scale,
                    logits_scaling=1.0 / cfg.logit_scale,
                    attention_multiplier=a.scale if a.scale is not None else hd ** -0.5, mlp_bias=False)
    else:
        swa = cfg.family_config("A", "swa") if "swa" in cfg.family_variants.get("attention", {}) else None
        if swa is not None:
            _require(dataclasses.replace(swa, window=a.window) == a, "the variant A.swa may differ from the attention "
                     "table only in its window (Qwen layers share one attention config)")
        windows = [swa.window if x == "A.swa" else a.window for x, _ in pairs]
        sizes = {w for w in windows if w is not None}
        _require(len(sizes) <= 1, f"sliding windows of several sizes {sorted(sizes)} (Qwen has one sliding_window)")
        conf.update(model_type="qwen3" if arch == "Qwen3ForCausalLM" else "qwen2", use_sliding_window=bool(sizes),
                    sliding_window=next(iter(sizes), None), max_window_layers=0,
                    layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(len(pairs)):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[mix + "norm.weight"]
        _split_qkv(cfg, sd, mix, pre + "self_attn.", out)
        if a.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = sd[mix + "mixer.q_norm.weight"]
            out[pre + "self_attn.k_norm.weight"] = sd[mix + "mixer.k_norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[ffn + "norm.weight"]
        _swiglu(sd, ffn, pre + "mlp.", out, ("gate_proj", "up_proj", "down_proj"))
    return conf, out
