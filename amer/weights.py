"""Weights on disk and in a model: the safetensors layer that training checkpoints (:mod:`amer.checkpoint`) and
pretrained folders (:mod:`amer.hub`) share.

Tied weights are stored once (safetensors refuses two names for one storage); reading a file names the file when
it is damaged, and a weight holding NaN or infinity is refused by name (saving refuses them too, so such a file
was damaged after it was written); a written file gets the mode the umask gives, and a write that fails (a full
disk) is the ``OSError`` it is, naming the file; a model is built from weights on the meta device and given the
tensors themselves, so loading peaks at one copy of the weights. The model itself knows no file format: this
module and the two above it build models, never the reverse.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from amer import xla
from amer.config import ModelConfig
from amer.errors import CheckpointError
from amer.fileio import follow_umask
from amer.fileread import file_kind
from amer.model import HybridLM

__all__ = ["state_tensors", "save_tensors", "load_tensors", "check_weights", "check_finite", "restore_model",
           "model_from_weights"]


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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as the safetensors file ``path``, with the mode the umask gives (safetensors alone writes
    0600). A failed write (a full disk, a read-only file system) is raised as ``OSError`` naming ``path``:
    safetensors reports it as its own ``SafetensorError``, which no ``except OSError`` would catch."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m[1]) if m else errno.EIO
        raise OSError(code, os.strerror(code) if m else str(e).splitlines()[0], str(path)) from None
    follow_umask(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``; a missing or damaged file is a :class:`CheckpointError`
    naming it."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    kind = file_kind(path)
    if kind is not None:  # a FIFO would block the reader, a device never end
        raise CheckpointError(f"{path} {kind}")
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
    check_finite(weights, source)


DAMAGED = "amer never saves non-finite weights, so the file was damaged after it was written; use another checkpoint"


def check_finite(weights: dict[str, Any], source: str = "checkpoint", hint: str = DAMAGED) -> None:
    """Raise a :class:`CheckpointError` naming the first weight that holds NaN or infinity: a model built from
    it would decode NUL bytes, and training from it would blame the learning rate."""
    for name, t in weights.items():
        # the sum first: NaN and infinity reach it, and it allocates nothing (isfinite builds two copies);
        # only a sum that overflowed from finite values needs the element-wise check
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t.detach().sum())) \
                and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise CheckpointError(f"{source}: weight {name} holds {what} values ({hint})")


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
