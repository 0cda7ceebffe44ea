"""Other people's layout strings as amer patterns: Megatron-Core's hybrid layer pattern and the layer-type lists of
transformers configs (``layer_types``, ``layers_block_type``, ``block_types``).

Megatron-Core's hybrid models (``megatron/core/models/hybrid/hybrid_layer_allocation.py``, class ``Symbols``)
write one symbol per layer, each layer one pre-norm residual sub-layer as in amer:

=====  ==========================================  ============================================
 sym    Megatron-Core layer                         amer
=====  ==========================================  ============================================
 M      Mamba (Mamba-2 mixer)                       ``M``
 G      gated DeltaNet                              ``G``
 \\*     self-attention                              ``A``
 \\+     multi-latent attention (MLA)                ``D``
 \\-     MLP                                         ``E`` (``E.dense`` beside MoE layers)
 E      MoE                                         ``E``
 \\|     pipeline-stage boundary                     ``|``
 D      DeepSeek sparse attention (MLA + indexer)   none: refused
 /      multi-token-prediction section follows      none: refused
=====  ==========================================  ============================================

A string with both ``-`` and ``E`` becomes a pattern whose dense layers are the E family's variant ``dense``
(declare it, e.g. ``[model.moe.variants.dense] n_experts = 1``); without ``E`` the MLP layers are plain ``E`` blocks
(set ``moe.n_experts = 1``).

transformers names a layer's mixer (``sliding_attention`` is the A family's variant ``swa``: declare its window as
``[model.attention.variants.swa]``); the feed-forward that follows it in the same decoder layer is an ``E`` block,
except in lists that name feed-forward layers themselves (Nemotron-H's ``mlp`` and ``moe``). ``linear_attention``
(and the legacy ``mamba``) names a different block in each class, so it is resolved by the config's ``model_type``
or the ``linear`` argument. Which feed-forward layers route (dense first layers, every other layer) is not in these
lists: the converters in :mod:`amer.interop` read it from the rest of the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from amer.errors import PatternError
from amer.families import letters

__all__ = ["MEGATRON_SYMBOLS", "LINEAR_BY_MODEL", "from_megatron", "from_layer_types"]

# Megatron-Core symbol -> amer block (None: the dense MLP, decided by the string), or why amer refuses it
MEGATRON_SYMBOLS: dict[str, str | None] = {"M": "M", "G": "G", "*": "A", "+": "D", "-": None, "E": "E", "|": "|"}
_MEGATRON_LACKS = {
    "D": "DeepSeek sparse attention (MLA with a lightning indexer), which amer lacks",
    "/": "the start of Megatron-Core's multi-token-prediction layers, which amer lacks (give the main pattern only)",
}

# what ``linear_attention`` (or ``mamba``) is in each transformers model type
LINEAR_BY_MODEL = {"qwen3_next": "G", "olmo_hybrid": "G", "kimi_linear": "G", "minimax": "N", "bamba": "M",
                   "granitemoehybrid": "M", "nemotron_h": "M", "jamba": "S", "recurrent_gemma": "R"}
_MIXERS = {"full_attention": "A", "attention": "A", "sliding_attention": "A.swa", "conv": "C", "recurrent": "R"}
_LINEAR = ("linear_attention", "mamba")
_FFN = ("mlp", "moe")
_TYPES_LACKING = {
    "hybrid": "a layer that runs a shared attention block beside its Mamba (Zamba, Zamba2, Falcon-H1)",
    "indexed_attention": "sparse attention with an indexer (DeepSeek-V3.2, GLM-5)",
    "chunked_attention": "attention within fixed chunks (Llama 4)",
}
_LINEAR_HINT = ("give linear (--linear): 'G' (Qwen3-Next, OLMo-Hybrid, Kimi Linear), 'N' (MiniMax), 'M' (Bamba, "
                "Granite-4.0-H, Nemotron-H), 'S' (Jamba) or 'R' (RecurrentGemma), or the whole config (its model_type "
                "decides)")


def from_megatron(text: str, *, dense: str = "dense") -> str:
    """The amer pattern of a Megatron-Core hybrid layer pattern (``--hybrid-layer-pattern``), one block per symbol
    and ``|`` kept as the stage boundary; ``dense`` names the E variant of ``-`` layers beside ``E`` layers.

    >>> from_megatron("M-M-M*-|M-M-M*-")
    'MEMEMAE|MEMEMAE'
    >>> from_megatron("M-ME*E")
    'ME.dense MEAE'
    """
    if not isinstance(text, str) or not text.strip():
        raise PatternError(f"Megatron-Core pattern {text!r} is empty; expected symbols {_symbols()}", 0)
    stripped = text.strip()
    lead = len(text) - len(text.lstrip())
    mlp = f"E.{dense}" if "E" in stripped else "E"
    out: list[str] = []
    stage_start = lead
    for i, ch in enumerate(stripped, start=lead):
        if ch in _MEGATRON_LACKS:
            raise PatternError(f"Megatron-Core pattern {_shown(text)}: {ch!r} at position {i} is "
                               f"{_MEGATRON_LACKS[ch]}", i)
        if ch not in MEGATRON_SYMBOLS:
            raise PatternError(f"Megatron-Core pattern {_shown(text)}: {ch!r} at position {i} is not a Megatron-Core "
                               f"layer symbol; expected {_symbols()}", i)
        if ch == "|":
            if i == stage_start:
                raise PatternError(f"Megatron-Core pattern {_shown(text)}: empty pipeline stage at position {i}", i)
            stage_start = i + 1
        block = MEGATRON_SYMBOLS[ch] or mlp
        if out and out[-1][-1:].islower() and block != "|":
            out.append(" ")
        out.append(block)
    if stripped.endswith("|"):
        raise PatternError(f"Megatron-Core pattern {_shown(text)}: empty pipeline stage after the '|' at position "
                           f"{lead + len(stripped) - 1}", lead + len(stripped) - 1)
    return "".join(out)


def from_layer_types(types: Sequence[str] | Mapping[str, Any], *, linear: str | None = None,
                     ffn: bool | None = None) -> str:
    """The amer pattern of a transformers layer-type list, or of a whole config (a ``config.json`` as a dict: its
    ``layer_types``, ``layers_block_type`` or ``block_types``, and its ``model_type`` for ``linear_attention``).

    ``linear``: the block letter ``linear_attention`` / ``mamba`` layers are (default: by model type). ``ffn``:
    whether each layer carries its own feed-forward, an ``E`` after every mixer (default: unless the list names
    ``mlp`` / ``moe`` layers itself).

    >>> from_layer_types(["linear_attention"] * 3 + ["full_attention"], linear="G")
    'GEGEGEAE'
    >>> from_layer_types({"model_type": "nemotron_h", "layers_block_type": ["mamba", "mlp", "attention", "moe"]})
    'ME.dense AE'
    """
    model_type = None
    if isinstance(types, Mapping):
        config = types
        model_type = config.get("model_type")
        found = next((k for k in ("layer_types", "layers_block_type", "block_types") if config.get(k)), None)
        if found is None and isinstance(config.get("hybrid_override_pattern"), str):  # Nemotron-H's older form
            return from_megatron(config["hybrid_override_pattern"])
        if found is None:
            raise PatternError("the config lists no layer types (expected layer_types, layers_block_type or "
                               "block_types)")
        types = config[found]
        if found == "block_types" and config.get("num_hidden_layers"):  # RecurrentGemma's cycle
            types = [types[i % len(types)] for i in range(int(config["num_hidden_layers"]))]
    if isinstance(types, str) or not isinstance(types, Sequence) or not types:
        raise PatternError(f"layer types must be a non-empty list of names, got {types!r}")
    if linear is None and model_type is not None:
        linear = LINEAR_BY_MODEL.get(str(model_type))
    if linear is not None and (len(linear) != 1 or linear not in letters()):
        raise PatternError(f"linear={linear!r} is not a block letter (registered: {', '.join(letters())})")
    names = [str(t) for t in types]
    if ffn is None:
        ffn = not any(t in _FFN for t in names)
    dense = "E.dense" if "moe" in names else "E"
    blocks: list[str] = []
    for i, t in enumerate(names):
        if t in _MIXERS:
            block = _MIXERS[t]
        elif t in _LINEAR:
            if linear is None:
                raise PatternError(f"layer type {t!r} (layer {i}) names a different block in each class: "
                                   f"{_LINEAR_HINT}", i)
            block = linear
        elif t in _FFN:
            if ffn:
                raise PatternError(f"layer type {t!r} (layer {i}) is a feed-forward layer, but ffn=True puts one after "
                                   "every mixer", i)
            block = "E" if t == "moe" else dense
        elif t in _TYPES_LACKING:
            raise PatternError(f"layer type {t!r} (layer {i}) is {_TYPES_LACKING[t]}, which amer's pattern cannot "
                               "express yet", i)
        else:
            raise PatternError(f"layer type {t!r} (layer {i}) is not one amer maps; known: "
                               f"{', '.join([*_MIXERS, *_LINEAR, *_FFN])}", i)
        blocks.append(block)
        if ffn:
            blocks.append("E")
    return "".join(b if not (j and blocks[j - 1][-1:].islower()) else " " + b for j, b in enumerate(blocks))


def _symbols() -> str:
    return " ".join(repr(s) for s in MEGATRON_SYMBOLS)


def _shown(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
