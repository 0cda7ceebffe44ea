"""Weights on disk and in a model: the safetensors layer that training checkpoints (:mod:`amer.checkpoint`)
and pretrained folders (:mod:`amer.hub`) share.

Tied weights are stored once (safetensors refuses two names for one storage); reading a file names the file
when it is damaged; a model is built from weights on the meta device and given the tensors themselves, so
loading peaks at one copy of the weights. The model itself knows no file format: this module and the two
above it build models, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from amer import xla
from amer.config import ModelConfig
from amer.errors import CheckpointError
from amer.model import HybridLM

__all__ = ["state_tensors", "load_tensors", "check_weights", "restore_model", "model_from_weights"]


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state as host tensors, a tied weight under its first name only."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``; a missing or damaged file is a :class:`CheckpointError`
    naming it."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({msg})") from None


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a :class:`CheckpointError` naming what differs when ``weights`` are not exactly ``model``'s (names
    and shapes; a tied head may be stored once). ``model`` may live on the meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    tied = {k for k in missing if k == "lm_head.weight" and getattr(model, "cfg", None) is not None
            and model.cfg.tie_embeddings}
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for k, v in weights.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")


def restore_model(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``weights`` into ``model`` strictly (tied weights may be stored once)."""
    check_weights(model, weights, source)
    model.load_state_dict(weights, strict=False)


def model_from_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str,
                       device: str | torch.device = "cpu") -> HybridLM:
    """A :class:`~amer.model.HybridLM` of ``cfg`` holding ``weights`` (in fp32 on ``device``): built on the meta
    device and given the tensors themselves, so loading peaks at one copy of the weights, not two, and skips
    the random initialisation. On XLA it is built there and loaded by copy (moving keeps a tied head tied)."""
    if xla.is_xla(device):
        model = xla.move(HybridLM(cfg), device)
        restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=source)
        return model
    model = HybridLM.empty(cfg)
    check_weights(model, weights, source)
    return model.assign({k: weights[k].to(device=device, dtype=torch.float32) for k in list(weights)})
