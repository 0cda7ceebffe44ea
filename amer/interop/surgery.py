"""Hybrid surgery: re-shape an (imported) model's stack to a new pattern of the same depth.

Every block whose letter is unchanged at its position keeps its weights (and so does everything
outside the blocks: embedding, final norm, LM head); a block whose letter changed is initialised
fresh, as a new amer model of the new pattern would be, from ``seed``. Turning every second attention
layer of a Llama into ``M`` or ``R`` this way is the usual starting point for distilling a transformer
into a hybrid (Wang et al. 2024, "The Mamba in the Llama", arXiv 2408.15237).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from amer.config import ModelConfig
from amer.errors import PatternError
from amer.model import HybridLM
from amer.pattern import parse_pattern

__all__ = ["replace_pattern"]


def replace_pattern(model: HybridLM, pattern: str, *, seed: int = 0,
                    **family_configs: Any) -> tuple[HybridLM, ModelConfig, list[str], list[str]]:
    """``model`` re-shaped to ``pattern``: (new model, its config, kept block names, fresh block names).

    ``family_configs`` set the config of families the new pattern brings in (``mamba={"head_dim": 16}``);
    families already present keep their imported configs, so kept blocks compute what they did.
    """
    old = model.cfg
    new_layers = parse_pattern(pattern).layers
    if len(new_layers) != len(old.parsed.layers):
        raise PatternError(f"pattern {pattern!r} has {len(new_layers)} blocks but the model has "
                           f"{len(old.parsed.layers)} ({old.pattern!r}); surgery keeps the depth, so give one "
                           "letter per block")
    for layers, whose in ((old.parsed.layers, "the model"), (new_layers, f"pattern {pattern!r}")):
        odd = next((layer for layer in layers if layer.branch is not None or layer.share is not None), None)
        if odd is not None:
            raise PatternError(f"{whose} has a {'parallel layer' if odd.branch is not None else 'shared block'} "
                               f"({odd.written}, block {odd.index}); surgery swaps blocks one for one, without "
                               "either")
    present = {layer.family.spec.config_key for layer in old.parsed.layers}
    clash = sorted(k for k in family_configs if k in present)
    if clash:
        raise PatternError(f"model.{clash[0]} belongs to blocks the model already has; only families the new "
                           "pattern brings in can be configured")
    cfg = dataclasses.replace(old, pattern=pattern, family_configs={**old.family_configs, **family_configs})
    torch.manual_seed(seed)
    fresh_model = HybridLM(cfg).to(next(model.parameters()).dtype)
    kept, fresh = [], []
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(old.parsed.layers, cfg.parsed.layers)):
            if a.family == b.family:
                fresh_model.blocks[i].load_state_dict(model.blocks[i].state_dict())
                kept.append(f"L{i}:{b.name}")
            else:
                fresh.append(f"L{i}:{b.name}")
        fresh_model.embed.load_state_dict(model.embed.state_dict())
        fresh_model.norm.load_state_dict(model.norm.state_dict())
        if not cfg.tie_embeddings:
            fresh_model.lm_head.load_state_dict(model.lm_head.state_dict())
    return fresh_model.train(model.training), cfg, kept, fresh
