"""Typed configuration: one small dataclass per component (torchtitan style).

Every config can be built from a nested dict (a TOML table) with :func:`from_dict`, which rejects
unknown keys with the closest valid name, and validates itself in ``__post_init__`` so a bad value
fails where it is written, naming the field and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "AttentionConfig",
    "MambaConfig",
    "MoEConfig",
    "RecurrentConfig",
    "ModelConfig",
    "STPConfig",
    "stp_config_from_preset",
    "from_dict",
    "to_dict",
    "load_toml",
    "suggest",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field and what is accepted."""


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class AttentionConfig:
    """Causal grouped-query attention with RoPE (the A family)."""

    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    rope_theta: float = 10000.0
    qk_norm: bool = False

    def __post_init__(self) -> None:
        _check(self.n_heads >= 1, f"attention.n_heads must be >= 1, got {self.n_heads}")
        _check(self.n_kv_heads >= 1, f"attention.n_kv_heads must be >= 1, got {self.n_kv_heads}")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"attention.n_heads ({self.n_heads}) must be divisible by attention.n_kv_heads "
            f"({self.n_kv_heads}); accepted n_kv_heads: "
            f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}",
        )
        _check(self.head_dim is None or self.head_dim >= 1, "attention.head_dim must be >= 1")
        _check(self.rope_theta > 0, f"attention.rope_theta must be > 0, got {self.rope_theta}")


@dataclass
class MambaConfig:
    """Mamba-2 / SSD mixer (the M family), Dao & Gu 2024 (arXiv 2405.21060)."""

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    n_groups: int = 1
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_range: tuple[float, float] = (1.0, 16.0)

    def __post_init__(self) -> None:
        self.a_init_range = tuple(self.a_init_range)  # type: ignore[assignment]
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            _check(getattr(self, name) >= 1, f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        _check(0 < self.dt_min <= self.dt_max, "mamba.dt_min must be in (0, dt_max]")
        lo, hi = self.a_init_range
        _check(0 < lo <= hi, f"mamba.a_init_range must be 0 < lo <= hi, got {self.a_init_range}")


@dataclass
class MoEConfig:
    """Mixture of SwiGLU experts (the E family): top-k fp32 router, dropless or capacity dispatch."""

    n_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None  # per-expert hidden width; default d_model * 2
    shared_expert: bool = False
    d_ff_shared: int | None = None  # default d_ff
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01  # Switch-Transformer load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight

    def __post_init__(self) -> None:
        _check(self.n_experts >= 1, f"moe.n_experts must be >= 1, got {self.n_experts}")
        _check(
            1 <= self.top_k <= self.n_experts,
            f"moe.top_k ({self.top_k}) must be between 1 and moe.n_experts ({self.n_experts})",
        )
        _check(self.d_ff is None or self.d_ff >= 1, "moe.d_ff must be >= 1")
        _check(
            self.dispatch in ("dropless", "capacity"),
            f"moe.dispatch must be 'dropless' or 'capacity', got {self.dispatch!r}",
        )
        _check(self.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        _check(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, "moe loss coefficients must be >= 0")


@dataclass
class RecurrentConfig:
    """Griffin RG-LRU recurrent block (the R family), De et al. 2024 (arXiv 2402.19427)."""

    lru_width: int | None = None  # default d_model
    n_heads: int = 4  # block-diagonal gate projections, as in recurrentgemma
    d_conv: int = 4
    c: float = 8.0  # the fixed scalar in a = sigma(Lambda)^(c * r)

    def __post_init__(self) -> None:
        _check(self.lru_width is None or self.lru_width >= 1, "recurrent.lru_width must be >= 1")
        _check(self.n_heads >= 1, f"recurrent.n_heads must be >= 1, got {self.n_heads}")
        _check(self.d_conv >= 1, f"recurrent.d_conv must be >= 1, got {self.d_conv}")
        _check(self.c > 0, f"recurrent.c must be > 0, got {self.c}")


@dataclass
class ModelConfig:
    """A hybrid language model: a pattern string plus one sub-config per block family."""

    pattern: str = "AEMR"
    d_model: int = 128
    vocab_size: int = 260
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)

    def __post_init__(self) -> None:
        from amer.pattern import parse_pattern  # local: pattern.py imports nothing from here

        _check(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        _check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        self.parsed = parse_pattern(self.pattern)
        fams = {layer.family.value for layer in self.parsed.layers}
        a = self.attention
        if "A" in fams and a.head_dim is None:
            _check(
                self.d_model % a.n_heads == 0,
                f"d_model ({self.d_model}) must be divisible by attention.n_heads ({a.n_heads}) "
                "or set attention.head_dim",
            )
        if "A" in fams and (a.head_dim or self.d_model // a.n_heads) % 2:
            raise ConfigError("attention head_dim must be even for RoPE")
        m = self.mamba
        if "M" in fams:
            d_inner = m.expand * self.d_model
            _check(
                d_inner % m.head_dim == 0,
                f"mamba.expand * d_model ({d_inner}) must be divisible by mamba.head_dim ({m.head_dim})",
            )
            _check(
                (d_inner // m.head_dim) % m.n_groups == 0,
                f"mamba heads ({d_inner // m.head_dim}) must be divisible by mamba.n_groups ({m.n_groups})",
            )
        r = self.recurrent
        if "R" in fams:
            width = r.lru_width or self.d_model
            _check(
                width % r.n_heads == 0,
                f"recurrent.lru_width ({width}) must be divisible by recurrent.n_heads ({r.n_heads})",
            )

    @property
    def n_layers(self) -> int:
        return len(self.parsed.layers)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The ``[model]`` table of preset ``name`` (``patterns/<name>.toml``), with top-level overrides."""
        from amer.pattern import load_preset

        data = dict(load_preset(name)["model"])
        data.update(overrides)
        return from_dict(cls, data, where="model.")


@dataclass
class STPConfig:
    """Semantic Tube Prediction policy: which taps, how strongly, from when.

    The loss kernel (:func:`amer.stp.compute_stp_loss`) knows none of this; the runtime reads it.
    """

    enabled: bool = False
    weight: float = 0.02
    start_step: int = 0
    ramp_steps: int = 0
    n_spans: int = 4
    layers: str | None = None  # selector string, e.g. "A-1,M-1,E-1,R-1" or "final"
    family_weights: dict[str, float] | None = None  # e.g. {"A": 1.0, "M": 0.5}

    def __post_init__(self) -> None:
        _check(self.weight >= 0, f"stp.weight must be >= 0, got {self.weight}")
        _check(self.start_step >= 0, f"stp.start_step must be >= 0, got {self.start_step}")
        _check(self.ramp_steps >= 0, f"stp.ramp_steps must be >= 0, got {self.ramp_steps}")
        _check(self.n_spans >= 1, f"stp.n_spans must be >= 1, got {self.n_spans}")
        if self.enabled:
            _check(
                bool(self.layers and self.layers.strip()),
                "stp.enabled is true but stp.layers is empty: choose the taps explicitly, "
                "e.g. 'final', 'A-1,M-1,E-1,R-1' or 'L7'",
            )
        if self.family_weights:
            allowed = {"A", "M", "E", "R", "final", "embed"}
            for k, v in self.family_weights.items():
                _check(k in allowed, f"stp.family_weights key {k!r} is not one of {sorted(allowed)}{suggest(k, allowed)}")
                _check(v >= 0, f"stp.family_weights[{k!r}] must be >= 0, got {v}")


def stp_config_from_preset(name: str) -> STPConfig:
    """The ``[stp]`` table of preset ``name``; a preset without one has STP disabled."""
    from amer.pattern import load_preset

    return from_dict(STPConfig, load_preset(name).get("stp", {}), where="stp.")


# ----------------------------------------------------------------------------------------------
# dict / TOML conversion

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {type(data).__name__}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(
                f"unknown key '{where}{key}'{suggest(k, names)} (accepted: {', '.join(names)})"
            )
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{k}.")
        else:
            value = _coerce(value, tp, f"{where}{k}")
        kwargs[k] = value
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Light type checking for scalar fields (TOML already gives typed values)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/TOML friendly)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a syntax error into a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Resolved from: preset ``[train]`` < ``--config`` TOML < CLI flags."""

    preset: str = _opt("small", "named preset in patterns/ giving model dims, STP selection and train defaults")
    pattern: str | None = _opt(None, "override the preset's block pattern, e.g. 'AEMEAEMR' or '(AE)*2M'")
    data: str = _opt("kjv", "corpus: 'kjv' (bundled King James Bible), 'stdlib' (Python stdlib source), "
                     "or a path to a text file, a directory, a JSONL file with 'text', or chat JSONL")
    steps: int = _opt(1000, "optimizer steps to train")
    batch_size: int = _opt(16, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    seq_len: int = _opt(256, "tokens per training sequence")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only; norms, biases, embeddings exempt)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value (0 disables)")
    dtype: Literal["float32", "bfloat16"] = _opt("float32", "compute dtype: float32, or bfloat16 autocast")
    device: str = _opt("cpu", "cpu, cuda, cuda:N or auto")
    seed: int = _opt(0, "seed for initialisation, data order and STP span sampling")
    val_fraction: float = _opt(0.05, "fraction of documents held out for validation")
    log_interval: int = _opt(25, "steps between log lines (JSONL, TensorBoard, metrics)")
    eval_interval: int = _opt(250, "steps between validation-loss evaluations (and checkpoints)")
    eval_batches: int = _opt(8, "validation batches per evaluation")
    keep_last: int = _opt(2, "checkpoints kept besides the best one")
    out_dir: str = _opt("checkpoints", "where run directories are created")
    run_name: str | None = _opt(None, "run directory name (default: <preset>-<YYYYmmdd-HHMMSS>)")
    resume: str | None = _opt(None, "continue a run: a run directory or checkpoint directory")
    max_bad_steps: int = _opt(3, "consecutive non-finite losses tolerated before the run stops")
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(True, "write TensorBoard event files")
    stp: STPConfig = field(default_factory=STPConfig, metadata={"help": "STP policy"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model config"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_interval", "eval_interval"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.seq_len >= 3, f"train.seq_len must be >= 3 (STP needs three positions), got {self.seq_len}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _check(0 < self.val_fraction < 1, f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        _check(self.seq_len <= self.model.max_seq_len,
               f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
