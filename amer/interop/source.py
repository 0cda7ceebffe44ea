"""A transformers model folder read straight from disk: ``config.json`` and its safetensors weights.

Nothing here imports ``transformers``: the config is plain JSON and the weights are safetensors
(one file, or shards listed in ``model.safetensors.index.json``), so a checkpoint imports on a
machine that has only amer. Every tensor a converter takes is marked used; a weight no converter
took means the source has something amer would silently drop (a bias, an extra norm), so
:meth:`Source.check_all_used` turns it into an error naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from amer.errors import CheckpointError

__all__ = ["Source", "unsupported"]


def unsupported(arch: str, what: str) -> CheckpointError:
    """The one-line error for a source amer cannot express: the class and what is missing."""
    return CheckpointError(f"cannot import {arch}: {what}")


class Source:
    """Config and weights of one transformers checkpoint folder (or a file inside it)."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_file():  # config.json, model.safetensors or the shard index: the folder holding it
            p = p.parent
        if not p.is_dir():
            raise CheckpointError(f"{path}: no such transformers model folder (expected a directory with "
                                  "config.json and *.safetensors)")
        self.root = p
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{p}: no config.json (a transformers model folder written by save_pretrained)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{cfg_file}: not readable as JSON ({err})") from None
        archs = self.config.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise CheckpointError(f"{cfg_file}: 'architectures' must name exactly one model class, got {archs!r}")
        self.arch: str = archs[0]
        self._files = self._weight_files()
        self._used: set[str] = set()

    def _weight_files(self) -> dict[str, Path]:
        """tensor name -> the safetensors file holding it."""
        from safetensors import safe_open

        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{index}: not a safetensors shard index ({err})") from None
            files = {name: self.root / shard for name, shard in weight_map.items()}
            missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing")
            return files
        single = self.root / "model.safetensors"
        if not single.is_file():
            other = sorted(x.name for x in self.root.glob("*.bin"))
            hint = f" (found {other[0]}: re-save it with safe_serialization)" if other else ""
            raise CheckpointError(f"{self.root}: no model.safetensors or model.safetensors.index.json{hint}")
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{single}: not a readable safetensors file ({err})") from None

    def get(self, key: str, *, optional: bool = False) -> Tensor | None:
        """The tensor ``key`` in fp32 (marked used); None for an absent optional one."""
        from safetensors import safe_open

        if key not in self._files:
            if optional:
                return None
            raise unsupported(self.arch, f"weight {key!r} is missing from {self.root}")
        self._used.add(key)
        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32)

    def has(self, key: str) -> bool:
        return key in self._files

    def skip(self, prefix: str) -> list[str]:
        """Leave out the weights under ``prefix`` (unread, and not an error for :meth:`check_all_used`): a part of
        the checkpoint the causal LM never runs and transformers drops on load too, such as a multi-token-prediction
        head. Returns their names."""
        names = sorted(k for k in self._files if k.startswith(prefix))
        self._used.update(names)
        return names

    def check_all_used(self, ignore: tuple[str, ...] = ("rotary_emb.inv_freq",)) -> None:
        """Every weight of the source went somewhere; otherwise name what amer would drop."""
        left = sorted(k for k in self._files if k not in self._used and not k.endswith(ignore))
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise unsupported(self.arch, f"amer has no place for weight {left[0]!r}{more}: the source uses an "
                              "option amer's blocks lack")

    # -- config access -------------------------------------------------------------------------------

    def cfg(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def require(self, key: str, allowed: tuple[Any, ...], default: Any = None, why: str = "") -> Any:
        """The config value ``key``, which must be one of ``allowed`` (what amer can express)."""
        value = self.config.get(key, default)
        if value not in allowed:
            what = f"{key}={value!r} (amer supports {', '.join(map(repr, allowed))}{'; ' + why if why else ''})"
            raise unsupported(self.arch, what)
        return value

    def rope(self, params: dict[str, Any] | None = None) -> tuple[float, float, dict[str, Any]]:
        """(theta, rotated fraction of the head, the A family's scaling options) of RoPE: plain, linear (position
        interpolation) or Llama 3.1's frequency-dependent scaling (``rope_type`` llama3); other scaled variants are
        refused by name. ``params``: one layer type's ``rope_parameters`` (Gemma 3) instead of the config's."""
        scaling = self.config.get("rope_scaling") or {} if params is None else {}
        params = self.config.get("rope_parameters") or {} if params is None else params
        kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        theta = params.get("rope_theta", self.config.get("rope_theta", 10000.0))
        fraction = params.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        if kind == "default":
            return float(theta), float(fraction), {}
        if kind == "linear":
            return float(theta), float(fraction), {"rope_linear_factor": float({**scaling, **params}["factor"])}
        if kind == "llama3":
            p = {**scaling, **params}
            original = p.get("original_max_position_embeddings") or self.config.get("max_position_embeddings")
            return float(theta), float(fraction), {
                "rope_scale_factor": float(p["factor"]), "rope_scale_low": float(p.get("low_freq_factor", 1.0)),
                "rope_scale_high": float(p.get("high_freq_factor", 4.0)), "rope_scale_original": int(original)}
        raise unsupported(self.arch, f"rope_type={kind!r} (amer's attention has plain RoPE, linear and Llama 3.1's "
                          "scaling: rope_type 'default', 'linear' or 'llama3')")

    def time_step_limit_is_open(self) -> bool:
        lim = self.config.get("time_step_limit", (0.0, math.inf))
        if isinstance(lim, (list, tuple)) and len(lim) == 2:
            hi = lim[1]
            hi = math.inf if isinstance(hi, dict) or hi is None else float(hi)
            return float(lim[0]) == 0.0 and math.isinf(hi)
        return False
