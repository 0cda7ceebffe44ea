"""Checking saved AdamW state against the optimizer it is about to be loaded into.

``Optimizer.load_state_dict`` trusts what it is given: moments of the wrong shape reach the fused AdamW
kernel, which reads past their buffers (a crash, or garbage that later looks like a learning-rate
problem). So every tensor and every parameter group of a checkpoint is checked first, and a mismatch is
a :class:`~amer.errors.CheckpointError` naming the tensor, the parameter and the file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from amer.errors import CheckpointError

__all__ = ["checked_state_dict"]

_MOMENTS = ("exp_avg", "exp_avg_sq")
_REQUIRED_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay")


def _param_names(opt: torch.optim.Optimizer, model: nn.Module | None) -> list[str]:
    """The name of each parameter by its index in the optimizer's state dict (groups in order)."""
    by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    return [by_id.get(id(p), f"parameter {i}")
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])]


def _check_groups(opt: torch.optim.Optimizer, saved: Any, where: str) -> list[dict[str, Any]]:
    current = opt.state_dict()["param_groups"]
    if not isinstance(saved, list) or not all(isinstance(g, dict) for g in saved):
        raise CheckpointError(f"{where}: optimizer.param_groups must be a list of groups, got {type(saved).__name__}")
    if len(saved) != len(current):
        raise CheckpointError(f"{where}: {len(saved)} optimizer parameter groups, the model's optimizer has "
                              f"{len(current)} (a checkpoint of another model or optimizer)")
    groups = []
    for i, (g, cur) in enumerate(zip(saved, current)):
        name = f"{where}: optimizer.param_groups[{i}]"
        missing = [k for k in _REQUIRED_GROUP_KEYS if k not in g]
        unknown = sorted(set(g) - set(cur))
        if missing or unknown:
            problem = f"lacks {missing}" if missing else f"has unknown keys {unknown}"
            raise CheckpointError(f"{name} {problem}")
        if g["params"] != cur["params"]:
            raise CheckpointError(f"{name} holds parameters {_ids(g['params'])}, the model's group holds "
                                  f"{_ids(cur['params'])} (a checkpoint of another model)")
        for key in ("lr", "eps", "weight_decay"):
            v = g[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CheckpointError(f"{name}.{key} must be a finite number >= 0, got {v!r}")
        betas = g["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise CheckpointError(f"{name}.betas must be two numbers in [0, 1), got {betas!r}")
        if g.get("maximize", False) is not False:
            raise CheckpointError(f"{name}.maximize is {g['maximize']!r}: training minimises the loss (false)")
        if g.get("amsgrad", cur.get("amsgrad", False)) != cur.get("amsgrad", False):
            raise CheckpointError(f"{name}.amsgrad is {g['amsgrad']!r}, the optimizer uses {cur.get('amsgrad')!r}")
        for key, v in g.items():
            if key not in _REQUIRED_GROUP_KEYS and v is not None and not isinstance(v, (bool, int, float, str)):
                raise CheckpointError(f"{name}.{key} must be a plain value, got {type(v).__name__}")
        # JSON turned tuples (AdamW betas) into lists; give them back so the restored state_dict equals the saved one
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()})
    return groups


def _kind(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}"


def _ids(ids: Any) -> str:
    if isinstance(ids, list) and len(ids) > 6:
        return f"{ids[:3]}...{ids[-2:]} ({len(ids)} in all)"
    return repr(ids)


def checked_state_dict(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       source: str, model: nn.Module | None = None) -> dict[str, Any]:
    """The state dict to load into ``opt``, built from ``tensors`` (``optim.safetensors``) and
    ``meta["optimizer"]`` (``meta.json``) of checkpoint ``source``; every mismatch raises."""
    where = f"{source}/meta.json"
    fname = f"{source}/optim.safetensors"
    extra = meta.get("optimizer")
    if not isinstance(extra, dict) or "param_groups" not in extra:
        raise CheckpointError(f"{where} has no optimizer.param_groups, but the checkpoint has optim.safetensors")
    groups = _check_groups(opt, extra["param_groups"], where)
    params = [p for g in opt.param_groups for p in g["params"]]
    names = _param_names(opt, model)
    amsgrad = any(g.get("amsgrad", False) for g in opt.param_groups)
    expected = {"step", *_MOMENTS, *(("max_exp_avg_sq",) if amsgrad else ())}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pid_text, dot, kind = key.partition(".")
        if not dot or not pid_text.isascii() or not pid_text.isdigit() or kind not in expected:
            raise CheckpointError(f"{fname}: unexpected tensor {key!r}; expected '<parameter index>.<"
                                  f"{'|'.join(sorted(expected))}>'")
        pid = int(pid_text)
        if pid >= len(params):
            raise CheckpointError(f"{fname}: tensor {key!r} is for parameter {pid}, the optimizer has "
                                  f"{len(params)} parameters (0..{len(params) - 1})")
        p, pname = params[pid], names[pid]
        if kind == "step":
            if t.numel() != 1 or t.dtype != torch.float32:
                raise CheckpointError(f"{fname}: tensor {key!r} ({pname}) must be one float32 step count, got "
                                      f"{_kind(t)}")
            step = float(t.reshape(()))
            if not math.isfinite(step) or step < 0 or step != int(step):
                raise CheckpointError(f"{fname}: tensor {key!r} ({pname}) is step {step}; expected a whole number >= 0")
            t = t.reshape(())
        else:
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{fname}: tensor {key!r} is {_kind(t)}, but parameter {pid} ({pname}) is "
                                      f"{_kind(p)}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{fname}: tensor {key!r} ({pname}) has non-finite values")
            if kind != "exp_avg" and (t < 0).any():
                raise CheckpointError(f"{fname}: tensor {key!r} ({pname}) has negative values (a second moment)")
        state.setdefault(pid, {})[kind] = t  # load_state_dict moves it to the parameter's device
    for pid, st in state.items():
        lacking = sorted(expected - set(st))
        if lacking:
            raise CheckpointError(f"{fname}: parameter {pid} ({names[pid]}) has {sorted(st)} but lacks {lacking}")
    return {"state": state, "param_groups": groups}
