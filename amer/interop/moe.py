"""Mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE, OLMoE) and what every MoE converter shares.

A layer is ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``: ``A`` then ``E``. The router of each class is a set
of E options (the mapping is the table of ``docs/moe.md``). Models whose feed-forward is dense in some layers
(Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``, Jamba's ``expert_layer_period``, LFM2-MoE's
``num_dense_layers``, Nemotron-H's ``mlp`` layers) get the E family's variant ``dense`` for those layers: the
pattern writes them ``E.dense``, and taps and selectors still count them as E blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.blocks.moe import MoEConfig
from amer.config import ModelConfig
from amer.interop.common import Converted, attention_options, attention_weights, converter, shared_options
from amer.interop.llama import _embeddings, attention_layers
from amer.interop.source import Source, unsupported

__all__ = ["DENSE", "ROUTED", "ffn_table", "ffn_blocks", "compact_pattern", "sparse_layers", "expert_count",
           "routed_weights", "ffn_weights", "router_options", "attention_windows", "convert_qwen_moe",
           "nemotron_router", "nemotron_moe_weights"]

DENSE = "dense"  # the E variant of a model's dense feed-forward layers
# router and shared-expert options a dense (one-expert) variant must leave at their defaults
_ROUTED_ONLY = ("shared_expert", "shared_expert_gate", "n_shared_experts", "d_ff_shared", "expert_bias",
                "bias_update_rate", "n_groups", "topk_groups", "d_latent")


def expert_count(src: Source) -> int:
    """The routed experts of a config (0: none), under any of the names transformers configs give it (a config saved
    by transformers writes ``num_local_experts`` for Qwen3-MoE's ``num_experts``)."""
    c = src.config
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if c.get(key) is not None:
            return int(c[key])
    return 0


def router_options(src: Source, *, d_ff: str, renormalize: bool, **extra: Any) -> dict[str, Any]:
    """The E table of a top-k router (softmax unless ``extra`` says otherwise): ``d_ff`` names the config key of the
    experts' width; ``renormalize`` is the class's ``norm_topk_prob`` (a top-1 choice is then renormalised too)."""
    c = src.config
    k = int(c.get("num_experts_per_tok", 2))
    table = {"n_experts": expert_count(src), "top_k": k, "d_ff": int(c[d_ff]), "renormalize": renormalize,
             "renormalize_top1": renormalize and k == 1, **extra}
    for key, option in (("router_aux_loss_coef", "aux_loss_coef"), ("router_z_loss_coef", "z_loss_coef")):
        if c.get(key) is not None:  # the source's training weights of the balancing losses, where it has them
            table[option] = float(c[key])
    return table


def ffn_table(routed: dict[str, Any] | None, dense_d_ff: int | None, sparse: list[bool],
              common: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The E family's table and each layer's E block: all routed (``E``), all dense (``E``, one expert), or routed
    with the variant ``dense`` (``E.dense``) for the dense layers. ``common``: options of both (the activation)."""
    common = common or {}
    dense = {"n_experts": 1, "d_ff": dense_d_ff, **common}
    if routed is None or not any(sparse):
        return dense, ["E"] * len(sparse)
    routed = {**routed, **common}
    if all(sparse):
        return routed, ["E"] * len(sparse)
    plain = MoEConfig()
    variant = {"n_experts": 1, "d_ff": dense_d_ff, **{k: getattr(plain, k) for k in _ROUTED_ONLY if k in routed}}
    return {**routed, "variants": {DENSE: variant}}, ["E" if s else f"E.{DENSE}" for s in sparse]


def compact_pattern(blocks: list[str]) -> str:
    """The pattern of a list of blocks, as its shortest repeating unit: ``(AE)*4``, ``(S E.dense S E)*2``; blocks with
    a variant are written apart."""
    sep = " " if any("." in b for b in blocks) else ""
    n = len(blocks)
    for size in range(1, n + 1):
        if n % size == 0 and blocks == blocks[:size] * (n // size):
            unit = sep.join(blocks[:size])
            return f"({unit})*{n // size}" if n // size > 1 else unit
    return sep.join(blocks)


def sparse_layers(src: Source, n_layers: int) -> list[bool]:
    """Which layers route (Qwen2-MoE, Qwen3-MoE, Qwen3-Next): those not in ``mlp_only_layers`` whose index + 1 is a
    multiple of ``decoder_sparse_step``, when the model has experts at all."""
    c = src.config
    only = set(c.get("mlp_only_layers") or [])
    step = int(c.get("decoder_sparse_step") or 1)
    experts = expert_count(src)
    return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]


def routed_weights(src: Source, pre: str, blk: int, n_experts: int, state: dict[str, Tensor], *,
                   names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), gated: bool = True) -> None:
    """Routed experts of ``pre`` (ending in ``experts.``) into block ``blk``'s ``w_gate_up`` (E, D, 2F) and ``w_down``
    (E, F, D): one (gate, up, down) Linear each as transformers saves them (``names``; ungated: up and down only), or
    the fused ``gate_up_proj`` (E, 2F, D) / ``up_proj`` and ``down_proj`` (E, D, F) of a model held in memory."""
    out = f"blocks.{blk}.mixer."
    gate, up, down = names
    fused = "gate_up_proj" if gated else "up_proj"
    if src.has(pre + fused) and src.has(pre + "down_proj"):
        state[out + "w_gate_up"] = src.get(pre + fused).transpose(1, 2).contiguous()
        state[out + "w_down"] = src.get(pre + "down_proj").transpose(1, 2).contiguous()
        return
    gu, dn = [], []
    for e in range(n_experts):
        ex = f"{pre}{e}."
        w = [src.get(f"{ex}{gate}.weight").T] if gated else []
        gu.append(torch.cat(w + [src.get(f"{ex}{up}.weight").T], dim=1))
        dn.append(src.get(f"{ex}{down}.weight").T)
    state[out + "w_gate_up"] = torch.stack(gu).contiguous()
    state[out + "w_down"] = torch.stack(dn).contiguous()


def ffn_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], *, into: str = "",
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), gated: bool = True) -> None:
    """A (gated) feed-forward of ``pre`` as a one-expert E (``into`` empty: ``w_gate_up`` (1, D, 2F), ``w_down``
    (1, F, D)) or as the E's shared experts (``into="shared."``: ``shared.gate_up.weight`` (2F, D), ``shared.down``)."""
    gate, up, down = names
    out = f"blocks.{blk}.mixer."
    w = torch.cat(([src.get(f"{pre}{gate}.weight")] if gated else []) + [src.get(f"{pre}{up}.weight")])  # (2F, D)
    if into:
        state[f"{out}{into}gate_up.weight"] = w
        state[f"{out}{into}down.weight"] = src.get(f"{pre}{down}.weight")
    else:
        state[out + "w_gate_up"] = w.T.unsqueeze(0).contiguous()
        state[out + "w_down"] = src.get(f"{pre}{down}.weight").T.unsqueeze(0).contiguous()


def attention_windows(src: Source, attn: dict[str, Any], n_layers: int) -> tuple[dict[str, Any], list[str]]:
    """Sliding windows as each class reads them: none (OLMoE's mask is causal whatever its config says); one for
    every layer (``attention.window``: Qwen3-MoE with ``use_sliding_window``); or per layer (Qwen2-MoE:
    ``layer_types``, or the class's rule, every other layer from the first below ``max_window_layers``) as the A
    family's variant ``swa`` (``A.swa``)."""
    c = src.config
    qwen2 = src.arch == "Qwen2MoeForCausalLM"
    window = c.get("sliding_window")
    if src.arch == "OlmoeForCausalLM" or not c.get("use_sliding_window", False):
        window = None
    kinds = c.get("layer_types") if qwen2 else None
    if window in (None, 0):  # (0: Qwen2-MoE's "none")
        if kinds is not None and "sliding_attention" in kinds:
            raise unsupported(src.arch, "layer_types name sliding_attention layers but the config sets no window")
        return {**attn, "window": None}, ["A"] * n_layers
    if not qwen2:
        return {**attn, "window": int(window)}, ["A"] * n_layers
    if kinds is None:
        first = int(c.get("max_window_layers", n_layers))
        kinds = ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention" for i in range(n_layers)]
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise unsupported(src.arch, f"layer_types must list one type per layer ({n_layers}), got {kinds!r}")
    bad = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if bad:
        raise unsupported(src.arch, f"layer type {bad[0]!r} (expected full_attention / sliding_attention)")
    return attention_layers(src, attn, [int(window) if k == "sliding_attention" else None for k in kinds])


@converter("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
def convert_qwen_moe(src: Source) -> Converted:
    """Qwen2-MoE (q/k/v biases, a shared expert with a sigmoid gate, raw top-k weights by default), Qwen3-MoE (per-head
    q/k norms) and OLMoE (q/k norms over the whole projections, raw top-k weights, no dense layers)."""
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU")
    L = int(c["num_hidden_layers"])
    attn = attention_options(src)
    olmoe, qwen2 = src.arch == "OlmoeForCausalLM", src.arch == "Qwen2MoeForCausalLM"
    if qwen2:  # biases on q, k, v only
        bias = bool(c.get("qkv_bias", True))
        attn.update(qkv_bias=bias, out_bias=False)
    if olmoe:
        src.require("clip_qkv", (None,), None, "amer's attention does not clip q, k and v")
        attn.update(qk_norm=True, qk_norm_scope="projection")
    else:
        attn["qk_norm"] = src.arch == "Qwen3MoeForCausalLM"
    attn, attn_blocks = attention_windows(src, attn, L)
    sparse = [True] * L if olmoe else sparse_layers(src, L)
    routed = router_options(src, d_ff="intermediate_size" if olmoe else "moe_intermediate_size",
                            renormalize=bool(c.get("norm_topk_prob", False)))
    shared = int(c.get("shared_expert_intermediate_size") or 0) if qwen2 else 0
    if shared:
        routed.update(shared_expert=True, d_ff_shared=shared, shared_expert_gate=True)
    moe, ffn_blocks = ffn_table(routed, int(c["intermediate_size"]), sparse)
    blocks = [b for pair in zip(attn_blocks, ffn_blocks) for b in pair]
    cfg = ModelConfig(pattern=compact_pattern(blocks), **shared_options(src), attention=attn, moe=moe)
    state = _embeddings(src, cfg)
    for i in range(L):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        attention_weights(src, pre + "self_attn.", blk, state, qk_norm=bool(attn["qk_norm"]))
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        if not sparse[i]:
            ffn_weights(src, pre + "mlp.", blk + 1, state)
            continue
        state[f"blocks.{blk + 1}.mixer.router.weight"] = src.get(pre + "mlp.gate.weight")
        routed_weights(src, pre + "mlp.experts.", blk + 1, routed["n_experts"], state)
        if shared:
            ffn_weights(src, pre + "mlp.shared_expert.", blk + 1, state, into="shared.")
            state[f"blocks.{blk + 1}.mixer.shared_gate.weight"] = src.get(pre + "mlp.shared_expert_gate.weight")
        else:  # a zero-width shared expert adds nothing: its gate is never read
            src.skip(pre + "mlp.shared_expert")
    return Converted(cfg, state)


ROUTED = "E+"  # a converter's mark for a routed E layer before the pattern is spelled (``ffn_blocks``)


def ffn_blocks(letters: list[str], routed: dict[str, Any] | None, dense_d_ff: int,
               common: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The E table and the blocks of a one-mixer-per-layer stack whose feed-forward layers are marked ``E`` (dense)
    or :data:`ROUTED`: ``ffn_table`` over those layers, the other letters kept."""
    marks = [x for x in letters if x in ("E", ROUTED)]
    table, ffn = ffn_table(routed, dense_d_ff, [x == ROUTED for x in marks], common)
    it = iter(ffn)
    return table, [next(it) if x in ("E", ROUTED) else x for x in letters]


def nemotron_router(src: Source) -> dict[str, Any]:
    """Nemotron-H's routed layers (``NemotronHMoE``): sigmoid scores with the selection-only
    ``e_score_correction_bias``, group-limited top-k, renormalised (``norm_topk_prob``) and scaled, ungated experts,
    an always-on shared expert, and optionally a latent width."""
    c = src.config
    table = router_options(src, d_ff="moe_intermediate_size", renormalize=bool(c.get("norm_topk_prob", True)),
                           score="sigmoid", expert_bias=True, n_groups=int(c.get("n_group") or 1),
                           topk_groups=int(c.get("topk_group") or 1),
                           routed_scale=float(c.get("routed_scaling_factor") or 1.0))
    # always there: a width of 0 (or null) means the dense MLP's width, as in the class
    table.update(shared_expert=True,
                 d_ff_shared=int(c.get("moe_shared_expert_intermediate_size") or c["intermediate_size"]))
    if c.get("moe_latent_size"):
        table["d_latent"] = int(c["moe_latent_size"])
    return table


def nemotron_moe_weights(src: Source, pre: str, blk: int, n_experts: int, state: dict[str, Tensor]) -> None:
    """A ``NemotronHMoE`` (``pre`` ends in ``mixer.``) into block ``blk``'s E mixer."""
    out = f"blocks.{blk}.mixer."
    state[out + "router.weight"] = src.get(pre + "gate.weight")
    state[out + "expert_bias"] = src.get(pre + "gate.e_score_correction_bias")
    routed_weights(src, pre + "experts.", blk, n_experts, state, gated=False)
    if src.has(pre + "shared_experts.up_proj.weight"):
        ffn_weights(src, pre + "shared_experts.", blk, state, into="shared.", gated=False)
    if src.has(pre + "fc1_latent_proj.weight"):
        state[out + "to_latent.weight"] = src.get(pre + "fc1_latent_proj.weight")
        state[out + "from_latent.weight"] = src.get(pre + "fc2_latent_proj.weight")
