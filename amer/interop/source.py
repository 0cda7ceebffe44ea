"""A transformers model folder read straight from disk: ``config.json`` and its safetensors weights.

Nothing here imports ``transformers``: the config is plain JSON and the weights are safetensors
(one file, or shards listed in ``model.safetensors.index.json``), so a checkpoint imports on a
machine that has only amer. Every tensor a converter takes is marked used; a weight no converter
took means the source has something amer would silently drop (a bias, an extra norm), so
:meth:`Source.check_all_used` turns it into an error naming it.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from amer.errors import CheckpointError
from amer.fileread import file_kind, json_loads, read_regular
from amer.interop.defaults import ALIASES, CLASS_DEFAULTS, LEGACY, PARTIAL_ROTARY, TEXT_MODELS

__all__ = ["Source", "unsupported", "first_line"]


# sizes a converter multiplies or loops over, and the least each may be (no experts: a dense model): a
# negative, fractional or textual one is refused by name, before it can become an internal pattern like (AE)*-1
SIZES = {"num_hidden_layers": 1, "hidden_size": 1, "intermediate_size": 1, "num_attention_heads": 1,
         "num_key_value_heads": 1, "vocab_size": 1, "num_local_experts": 0, "num_experts_per_tok": 0,
         "num_experts": 0, "block_multiple_of": 1, "attn_layer_period": 1, "expert_layer_period": 1,
         "full_attention_interval": 1}


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none): an error fit for one line."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _read_json(path: Path) -> Any:
    data = read_regular(path, lambda why: CheckpointError(f"{path} {why}"))
    try:
        return json_loads(data)
    except ValueError as err:  # invalid JSON, not UTF-8, or nested thousands deep
        raise CheckpointError(f"{path}: not readable as JSON ({first_line(err)})") from None


def _keys(shard: Path, index: Path | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """The tensor names in safetensors file ``shard``'s header (their shapes added to ``shapes``); a missing or
    damaged file is named."""
    kind = file_kind(shard)
    if kind is not None:
        raise CheckpointError(f"{index}: shard {shard.name} {kind}" if index else f"{shard} {kind}")
    try:
        with safe_open(str(shard), framework="pt") as f:
            if shapes is not None:
                shapes.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
            return set(f.keys())
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for a corrupt header)
        raise CheckpointError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None


def unsupported(arch: str, what: str) -> CheckpointError:
    """The one-line error for a source amer cannot express: the class and what is missing."""
    return CheckpointError(f"cannot import {arch}: {what}")


class Source:
    """Config and weights of one transformers checkpoint folder (or a file inside it).

    Everything in it is checked before a byte of weights is read: ``config.json`` must be a JSON object whose
    sizes are positive integers; a shard index may only name shard files inside the folder (plain relative
    names: an absolute path or ``..`` is refused and never opened), and every shard must hold the tensors the
    index assigns to it. Links inside the folder are followed (a Hugging Face cache snapshot is made of them).
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_file():  # config.json, model.safetensors or the shard index: the folder holding it
            p = p.parent
        if not p.is_dir():
            raise CheckpointError(f"{path}: no such transformers model folder (expected a directory with "
                                  "config.json and *.safetensors)")
        self.root = p
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{p}: no config.json (a transformers model folder written by save_pretrained)")
        config = _read_json(cfg_file)
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object of settings, got a JSON {_kind(config)}")
        self.config: dict[str, Any] = config
        archs = self.config.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise CheckpointError(f"{cfg_file}: 'architectures' must name exactly one model class, got {archs!r:.80}")
        self.arch: str = archs[0]
        text = TEXT_MODELS.get(self.arch)
        if text is not None:  # a multimodal folder: its language model, as its causal-LM class
            nested = config.get("text_config")
            if not isinstance(nested, dict):
                raise unsupported(self.arch, "no text_config object in config.json (the language model's settings)")
            config = {**nested, "tie_word_embeddings": config.get("tie_word_embeddings",
                                                                  nested.get("tie_word_embeddings"))}
            self.arch = text[0]
        config = dict(config)
        for alias, kept in ALIASES.get(self.arch, {}).items():
            if alias in config and kept not in config:
                config[kept] = config[alias]
        for old, new in LEGACY.get(self.arch, {}).items():
            if old in config:
                config[new] = config.pop(old)
        self.config = {**CLASS_DEFAULTS.get(self.arch, {}), **config}  # what the class assumes for a setting left out
        for key, least in SIZES.items():
            value = self.config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise unsupported(self.arch, f"config.json {key} must be a whole number >= {least}, got "
                                  f"{value!r:.40}")
        # tensors with no elements (a zero-width shared expert, rank-0 adapters): transformers builds and runs them,
        # and they add nothing, so a converter never needs them and none is left over
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._files = self._weight_files()
        self._stored: dict[str, str] = {}  # a weight's name as a converter asks for it -> as the folder stores it
        if text is not None:
            self._text_weights(*text[1:])
        self._empty = {k for k, shape in self._shapes.items() if 0 in shape}
        self._used: set[str] = set()

    def _weight_files(self) -> dict[str, Path]:
        """tensor name -> the safetensors file holding it."""
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: not a safetensors shard index (expected a 'weight_map' object of "
                                      f"tensor name -> shard file name, got {weight_map!r:.60})")
            for shard in sorted(set(weight_map.values())):
                parts = PurePosixPath(shard).parts
                if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard or "\0" in shard:
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {self.root} "
                                          "(absolute paths and '..' are refused, and nothing outside is opened)")
            files = {name: self.root / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                held = _keys(shard, index, self._shapes)
                lacking = sorted(k for k, f in files.items() if f == shard and k not in held)
                if lacking:
                    raise CheckpointError(f"{index}: names tensor {lacking[0]!r} in shard {shard.name}, which does "
                                          "not hold it")
            return files
        single = self.root / "model.safetensors"
        if not single.exists():
            other = sorted(x.name for x in self.root.glob("*.bin"))
            hint = f" (found {other[0]}: re-save it with safe_serialization)" if other else ""
            raise CheckpointError(f"{self.root}: no model.safetensors or model.safetensors.index.json{hint}")
        return dict.fromkeys(_keys(single, shapes=self._shapes), single)

    def _text_weights(self, renames: dict[str, str], others: tuple[str, ...]) -> None:
        """The language model's weights under the names its causal-LM class stores (``renames``: stored prefix ->
        that class's); the rest of the multimodal model (``others``) left out, as its causal-LM class has none of
        it."""
        files, shapes = {}, {}
        for name, file in self._files.items():
            if name.startswith(others):
                continue
            old = next((p for p in renames if name.startswith(p)), None)
            key = name if old is None else renames[old] + name[len(old):]
            files[key], shapes[key], self._stored[key] = file, self._shapes[name], name
        self._files, self._shapes = files, shapes

    def get(self, key: str, *, optional: bool = False) -> Tensor | None:
        """The tensor ``key`` in fp32 (marked used); None for an absent optional one."""

        if key not in self._files:
            if optional:
                return None
            raise unsupported(self.arch, f"weight {key!r} is missing from {self.root}")
        self._used.add(key)
        try:
            with safe_open(str(self._files[key]), framework="pt") as f:
                return f.get_tensor(self._stored.get(key, key)).to(torch.float32)
        except Exception as err:  # noqa: BLE001  (safetensors raises its own types for a damaged file)
            raise CheckpointError(f"{self._files[key]}: not a readable safetensors file ({first_line(err)})") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of tensor ``key`` as stored (None: no such tensor), read from the header alone."""
        return self._shapes.get(key)

    def has(self, key: str) -> bool:
        """Whether the folder holds tensor ``key`` with any elements."""
        return key in self._files and key not in self._empty

    def skip(self, prefix: str) -> list[str]:
        """Leave out the weights under ``prefix`` (unread, and not an error for :meth:`check_all_used`): a part of
        the checkpoint the causal LM never runs and transformers drops on load too, such as a multi-token-prediction
        head. Returns their names."""
        names = sorted(k for k in self._files if k.startswith(prefix))
        self._used.update(names)
        return names

    def check_all_used(self, ignore: tuple[str, ...] = ("rotary_emb.inv_freq",)) -> None:
        """Every weight of the source went somewhere; otherwise name what amer would drop."""
        left = sorted(k for k in self._files if k not in self._used and k not in self._empty and not k.endswith(ignore))
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
        refused by name. ``params``: one layer type's ``rope_parameters`` (Gemma 3) instead of the config's.

        As in transformers, a legacy ``rope_scaling`` replaces ``rope_parameters`` whole, and the rotated fraction
        is read only by the classes whose rotary embedding reads it (the others turn the whole head)."""
        if params is None:
            params = self.config.get("rope_scaling") or self.config.get("rope_parameters") or {}
        kind = params.get("rope_type") or params.get("type") or "default"
        theta = params.get("rope_theta", self.config.get("rope_theta", 10000.0))
        fraction = 1.0
        if self.arch == "BambaForCausalLM":  # the class sets 0.5 over a top-level factor; rope_parameters' wins
            fraction = params.get("partial_rotary_factor", 0.5)
        elif self.arch in PARTIAL_ROTARY:
            fraction = params.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        if kind == "default":
            return float(theta), float(fraction), {}
        if kind == "linear":
            return float(theta), float(fraction), {"rope_linear_factor": float(params["factor"])}
        if kind == "llama3":
            original = params.get("original_max_position_embeddings") or self.config.get("max_position_embeddings")
            return float(theta), float(fraction), {
                "rope_scale_factor": float(params["factor"]),
                "rope_scale_low": float(params.get("low_freq_factor", 1.0)),
                "rope_scale_high": float(params.get("high_freq_factor", 4.0)), "rope_scale_original": int(original)}
        raise unsupported(self.arch, f"rope_type={kind!r} (amer's attention has plain RoPE, linear and Llama 3.1's "
                          "scaling: rope_type 'default', 'linear' or 'llama3')")

    def time_step_limit_is_open(self) -> bool:
        lim = self.config.get("time_step_limit", (0.0, math.inf))
        if isinstance(lim, (list, tuple)) and len(lim) == 2:
            hi = lim[1]
            hi = math.inf if isinstance(hi, dict) or hi is None else float(hi)
            return float(lim[0]) == 0.0 and math.isinf(hi)
        return False
