"""What the MoE, hybrid and zoo exporters (:mod:`amer.interop.export_moe`, :mod:`amer.interop.export_hybrid`,
:mod:`amer.interop.export_zoo`) share: a refusal that names the setting, the checks that a model's settings are
ones the target class can express, and the blocks' weights in transformers' layouts (the inverses of the
converters' maps).

A family's config is compared field by field with the family's defaults, so an option the target class has no
counterpart for (including options added to a family later) is refused by name, never silently dropped; fields
that only shape initialisation, a training scan's blocking or a training loss pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple

from torch import Tensor

from amer.blocks.attention import AttentionConfig
from amer.blocks.mamba1 import Mamba1Config
from amer.blocks.moe import MoEConfig
from amer.blocks.zamba import ZambaConfig
from amer.config import ModelConfig
from amer.errors import InputError
from amer.pattern import LayerSpec

__all__ = ["Tensors", "Written", "SHARED_DEFAULTS", "ROPE_SCALING", "rope_parameters",
           "refuse", "plain", "moe_plain", "shared", "pre_norms",
           "mixer_ffn_pairs", "FFN", "ffn_layers", "routed_out", "dense_out", "shared_out", "mamba1_out", "mamba2_out",
           "shortconv_out", "attention_out", "head_dim", "period"]

Tensors = dict[str, Tensor]
Written = tuple[dict[str, Any], Tensors]  # what a writer returns: the config.json contents and the weights
# fields that shape the initialisation, a training scan's blocking or a training loss, not the function computed
NOT_FUNCTION = {"dt_min", "dt_max", "dt_init_floor", "dt_scale", "dt_init", "chunk_size", "a_init_range",
                "aux_loss_coef", "z_loss_coef", "bias_update_rate"}
# E fields without effect when the block is one dense feed-forward (no router). Capacity dispatch is not among the
# inert ones for routed blocks: it drops the tokens over an expert's capacity in evaluation too, and every target
# class's experts are dropless
DENSE_INERT = {"top_k", "renormalize_top1", "score", "renormalize", "renormalize_eps", "routed_scale", "expert_bias",
               "n_groups", "topk_groups", "dispatch", "capacity_factor", "capacity_block"}
SHARED_DEFAULTS = (("embed_scale", 1.0), ("residual_scale", 1.0), ("logit_scale", 1.0), ("logit_softcap", None),
                   ("norm_offset", 0.0))


def refuse(what: str) -> InputError:
    return InputError(f"cannot export as a transformers model: {what}")


# the A family's RoPE scalings; every target class's rotary embedding reads rope_parameters' rope_type
ROPE_SCALING = ("rope_linear_factor", "rope_scale_factor", "rope_scale_low", "rope_scale_high", "rope_scale_original")


def rope_parameters(a: Any) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for attention config ``a``: plain RoPE, linear (position interpolation) or
    Llama 3.1's frequency-dependent scaling."""
    if a.rope_linear_factor is not None and a.rope_scale_factor is not None:
        raise refuse("attention.rope_linear_factor and rope_scale_factor together (transformers has one rope_type)")
    if a.rope_linear_factor is not None:
        return {"rope_type": "linear", "rope_theta": a.rope_theta, "factor": a.rope_linear_factor}
    if a.rope_scale_factor is not None:
        return {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": a.rope_scale_factor,
                "low_freq_factor": a.rope_scale_low, "high_freq_factor": a.rope_scale_high,
                "original_max_position_embeddings": a.rope_scale_original}
    return {"rope_type": "default", "rope_theta": a.rope_theta}


def _inert(obj: Any) -> set[str]:
    """Fields of ``obj`` without effect given its others: an attention's q/k norm scope without q/k norms, Llama 3.1
    scaling's factors without its scale factor, a zamba RoPE base without RoPE, dt/B/C norms' epsilon without them."""
    inert = set()
    if isinstance(obj, ZambaConfig) and not obj.rope:
        inert.add("rope_theta")
    if isinstance(obj, Mamba1Config) and obj.dt_bc_norm == "none":
        inert.add("dt_bc_norm_eps")
    if isinstance(obj, AttentionConfig):
        if not obj.qk_norm:
            inert.add("qk_norm_scope")
        if obj.rope_scale_factor is None:
            inert |= {"rope_scale_low", "rope_scale_high", "rope_scale_original"}
    return inert


def plain(obj: Any, where: str, target: str, allowed: Iterable[str] = ()) -> None:
    """Every field of config ``obj`` outside ``allowed`` (and the non-function and inert ones) at its default."""
    default, allowed = type(obj)(), set(allowed) | NOT_FUNCTION | _inert(obj)
    for f in dataclasses.fields(obj):
        if f.name not in allowed and getattr(obj, f.name) != getattr(default, f.name):
            raise refuse(f"{where}.{f.name}={getattr(obj, f.name)!r} has no counterpart in {target} (needs "
                         f"{getattr(default, f.name)!r})")


def moe_plain(e: MoEConfig, where: str, target: str, allowed: Iterable[str] = ()) -> None:
    """:func:`plain` for an E config, whose fields without effect in it pass: the router's in a one-expert (dense)
    block, the shared experts' width and count where it has none."""
    inert = set(DENSE_INERT) if e.n_experts == 1 else set()
    if not e.shared_expert:
        inert |= {"d_ff_shared", "n_shared_experts"}
    if e.dispatch != "capacity":
        inert |= {"capacity_factor", "capacity_block"}
    plain(e, where, target, set(allowed) | inert)


def shared(cfg: ModelConfig, target: str, allowed: Iterable[str] = ()) -> None:
    """The model-wide options outside ``allowed`` at their defaults."""
    for name, default in SHARED_DEFAULTS:
        if name not in allowed and getattr(cfg, name) != default:
            raise refuse(f"model.{name}={getattr(cfg, name)!r} has no counterpart in {target} (needs {default!r})")


def pre_norms(cfg: ModelConfig, target: str, variants: Iterable[str] = (), post: Iterable[str] = ()) -> None:
    """Every block pre-norm (``x + f(norm(x))``), or post-norm (``x + norm(f(x))``) where its layer key is in ``post``,
    with the plain residual (the other block options at their defaults); no variants but of the families or layer
    keys in ``variants``."""
    variants, post = set(variants), set(post)
    for layer in cfg.parsed.layers:
        if layer.variant is not None and not {str(layer.family), layer.key} & variants:
            raise refuse(f"{layer.key} (layer {layer.index}): {target} has one config per {layer.family.spec.name} "
                         "block, no variants")
        if layer.branch is not None:
            raise refuse(f"{layer.key} (layer {layer.index}) is a branch of a parallel layer; {target} runs one "
                         "mixer per residual layer")
        opts, want = cfg.block_options(layer), "post" if layer.key in post else "pre"
        if opts.norm_placement != want:
            raise refuse(f"{layer.key} (layer {layer.index}) has norm_placement {opts.norm_placement!r}; {target} "
                         f"places it {want!r}")
        for f in dataclasses.fields(opts):
            if f.name != "norm_placement" and getattr(opts, f.name) != f.default:
                raise refuse(f"{layer.key} (layer {layer.index}) has the block option {f.name}="
                             f"{getattr(opts, f.name)!r}, which {target} lacks (needs {f.default!r})")


def mixer_ffn_pairs(cfg: ModelConfig) -> list[tuple[LayerSpec, LayerSpec]] | None:
    """The layers as (token mixer, E) pairs, the shape of a decoder layer with its feed-forward; None otherwise."""
    layers = cfg.parsed.layers
    if len(layers) % 2 or any(str(e.family) != "E" or str(m.family) == "E" for m, e in zip(layers[::2], layers[1::2])):
        return None
    return list(zip(layers[::2], layers[1::2]))


class FFN(NamedTuple):
    """A model's E layers sorted: the one routed config, the one dense config, and which layers route."""

    routed: MoEConfig | None
    dense: MoEConfig | None
    routes: list[bool]


def ffn_layers(cfg: ModelConfig, layers: list[LayerSpec], target: str, *, activation: str = "silu",
               mlp_bias: bool = False) -> FFN:
    """The E ``layers`` of ``cfg`` as one routed and one dense feed-forward configuration (transformers classes have
    one of each at most), every expert of ``activation`` without biases; with ``mlp_bias`` (a class that reads
    ``mlp_bias``) the dense ones may have biases, all or none."""
    routed: tuple[str, MoEConfig] | None = None
    dense: tuple[str, MoEConfig] | None = None
    routes = []
    for layer in layers:
        e = cfg.layer_config(layer)
        if e.activation != activation or (e.bias and not mlp_bias):
            what = f"{activation}" if mlp_bias else f"{activation} without biases"
            raise refuse(f"{layer.key} (layer {layer.index}): {target}'s feed-forwards are {what} (moe.activation "
                         f"{e.activation!r}, moe.bias {e.bias})")
        routes.append(e.n_experts > 1)
        if e.n_experts == 1:
            moe_plain(e, f"moe ({layer.key})", target, {"n_experts", "d_ff", "activation", "bias"})
            dense = dense or (layer.key, e)
            if (e.d_ff or 2 * cfg.d_model) != (dense[1].d_ff or 2 * cfg.d_model):
                raise refuse(f"{layer.key} (layer {layer.index}) and {dense[0]} are dense feed-forwards of two widths; "
                             f"{target} has one")
            if e.bias != dense[1].bias:
                raise refuse(f"{layer.key} (layer {layer.index}) and {dense[0]} differ in moe.bias; {target}'s "
                             "mlp_bias sets every dense feed-forward's biases")
            continue
        routed = routed or (layer.key, e)
        if e != routed[1]:
            raise refuse(f"{layer.key} (layer {layer.index}) and {routed[0]} are two routed configurations; {target} "
                         "has one")
    return FFN(routed and routed[1], dense and dense[1], routes)


def routed_out(sd: Tensors, blk: str, dst: str, out: Tensors, *,
               names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), gated: bool = True) -> None:
    """Block ``blk``'s routed experts as one (gate, up, down) Linear each under ``dst`` (``...experts.``), the layout
    transformers saves."""
    gu, dn = sd[blk + "mixer.w_gate_up"], sd[blk + "mixer.w_down"]  # (E, D, 2F or F), (E, F, D)
    F_ = dn.shape[1]
    gate, up, down = names
    for e in range(gu.shape[0]):
        if gated:
            out[f"{dst}{e}.{gate}.weight"] = gu[e, :, :F_].T
        out[f"{dst}{e}.{up}.weight"] = gu[e, :, F_:].T if gated else gu[e].T
        out[f"{dst}{e}.{down}.weight"] = dn[e].T


def dense_out(sd: Tensors, blk: str, dst: str, out: Tensors, *,
              names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), gated: bool = True) -> None:
    """Block ``blk``'s one-expert E as a feed-forward of three (two ungated) Linears under ``dst``, with their biases
    where the block has them."""
    gu, dn = sd[blk + "mixer.w_gate_up"][0], sd[blk + "mixer.w_down"][0]
    F_ = dn.shape[0]
    gate, up, down = names
    if gated:
        out[f"{dst}{gate}.weight"] = gu[:, :F_].T
    out[f"{dst}{up}.weight"] = gu[:, F_:].T if gated else gu.T
    out[f"{dst}{down}.weight"] = dn.T
    if blk + "mixer.b_gate_up" in sd:
        b = sd[blk + "mixer.b_gate_up"][0]
        if gated:
            out[f"{dst}{gate}.bias"] = b[:F_]
        out[f"{dst}{up}.bias"] = b[F_:] if gated else b
        out[f"{dst}{down}.bias"] = sd[blk + "mixer.b_down"][0]


def shared_out(sd: Tensors, blk: str, dst: str, out: Tensors, *,
               names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), gated: bool = True) -> None:
    """Block ``blk``'s shared experts (fused into one feed-forward) under ``dst``."""
    w = sd[blk + "mixer.shared.gate_up.weight"]  # (2F, D): gate rows, then up rows
    gate, up, down = names
    if gated:
        out[f"{dst}{gate}.weight"], out[f"{dst}{up}.weight"] = w.chunk(2)
    else:
        out[f"{dst}{up}.weight"] = w
    out[f"{dst}{down}.weight"] = sd[blk + "mixer.shared.down.weight"]


def mamba2_out(sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """The M mixer at ``src`` in transformers' Mamba-2 names under ``dst``, with the biases it has."""
    for a, b in (("in_proj.weight", "in_proj.weight"), ("in_proj.bias", "in_proj.bias"),
                 ("out_proj.weight", "out_proj.weight"), ("out_proj.bias", "out_proj.bias"), ("dt_bias", "dt_bias"),
                 ("A_log", "A_log"), ("D", "D"), ("norm_weight", "norm.weight"), ("conv_bias", "conv1d.bias")):
        if src + a in sd:
            out[dst + b] = sd[src + a]
    out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)


def mamba1_out(sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """An S mixer (``src`` ends in ``mixer.``) in ``MambaMixer``'s names under ``dst``; its dt/B/C norms' gains where
    it has them (Jamba)."""
    out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)
    for name in ("conv_bias", "in_proj.weight", "in_proj.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                 "A_log", "D", "out_proj.weight", "out_proj.bias"):
        if src + name in sd:
            out[dst + name.replace("conv_", "conv1d.")] = sd[src + name]
    for n in ("dt", "b", "c"):
        if f"{src}{n}_norm.weight" in sd:
            out[f"{dst}{n}_layernorm.weight"] = sd[f"{src}{n}_norm.weight"]


def shortconv_out(sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """A C mixer (``src`` ends in ``mixer.``) as LFM2's ``ShortConv`` under ``dst`` (ending in ``conv.``)."""
    out[dst + "conv.weight"] = sd[src + "conv_weight"].unsqueeze(1)
    for a, b in (("conv_bias", "conv.bias"), ("in_proj.weight", "in_proj.weight"), ("in_proj.bias", "in_proj.bias"),
                 ("out_proj.weight", "out_proj.weight"), ("out_proj.bias", "out_proj.bias")):
        if src + a in sd:
            out[dst + b] = sd[src + a]


def head_dim(cfg: ModelConfig) -> int:
    a = cfg.attention
    return a.head_dim or cfg.d_model // a.n_heads


def attention_out(cfg: ModelConfig, sd: Tensors, blk: str, dst: str, out: Tensors, *, out_name: str = "o_proj",
                  norm_names: tuple[str, str] = ("q_norm", "k_norm"), norm_shift: float = 0.0) -> None:
    """Block ``blk``'s A mixer as q/k/v/o projections (their biases, q/k norms with ``norm_shift`` added to the
    gains) under ``dst``."""
    a, hd = cfg.attention, head_dim(cfg)
    sizes = [a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd]
    m = blk + "mixer."
    for n, w in zip("qkv", sd[m + "qkv.weight"].split(sizes)):
        out[f"{dst}{n}_proj.weight"] = w
    if m + "qkv.bias" in sd:
        for n, b in zip("qkv", sd[m + "qkv.bias"].split(sizes)):
            out[f"{dst}{n}_proj.bias"] = b
    out[f"{dst}{out_name}.weight"] = sd[m + "out_proj.weight"]
    if m + "out_proj.bias" in sd:
        out[f"{dst}{out_name}.bias"] = sd[m + "out_proj.bias"]
    if a.qk_norm:
        out[f"{dst}{norm_names[0]}.weight"] = sd[m + "q_norm.weight"] + norm_shift
        out[f"{dst}{norm_names[1]}.weight"] = sd[m + "k_norm.weight"] + norm_shift


def period(marked: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with ``marked[i] == (i % period == offset)`` for every layer, the shortest; None when the marks
    are not periodic. No marks at all: a period longer than the stack."""
    n = len(marked)
    if not any(marked):
        return n + 1, n
    for p in range(1, n + 1):
        for o in range(p):
            if all(m == (i % p == o) for i, m in enumerate(marked)):
                return p, o
    return None
