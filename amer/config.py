"""Typed configuration: one small dataclass per component (torchtitan style).

Every config can be built from a nested dict (a TOML table) with :func:`from_dict`, which rejects
unknown keys with the closest valid name, and validates itself in ``__post_init__`` so a bad value
fails where it is written, naming the field and what is accepted. Each field carries its ``--help``
text in its metadata (:func:`opt`), so the command line is generated from these classes.

The shared model dimensions live here (:class:`ModelConfig`, :class:`Dims`); each block family's own
settings live beside its mixer in ``amer/blocks/`` and are reached through the family registry.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, NamedTuple

from amer.configio import check, coerce, from_dict, load_toml, opt, suggest, to_dict
from amer.errors import ConfigError
from amer.families import FamilySpec, families, get_family

__all__ = [
    "ConfigError", "Dims", "ModelConfig", "STPConfig", "TrainConfig", "stp_config_from_preset", "from_dict",
    "to_dict", "load_toml", "suggest", "check", "opt", "options",
]


class Dims(NamedTuple):
    """The dimensions every mixer shares (a family's own settings come in its own config)."""

    d_model: int  # residual stream width
    n_layers: int  # depth of the whole stack (for residual-scaled initialisation)
    max_seq_len: int  # longest sequence the model accepts
    norm_eps: float  # RMSNorm epsilon
    init_std: float  # std of the normal weight init

    @property
    def out_std(self) -> float:
        """GPT-2 residual scaling: projections that write into the residual stream get std / sqrt(2L)."""
        return self.init_std / (2 * max(1, self.n_layers)) ** 0.5


@dataclass(init=False)
class ModelConfig:
    """A hybrid language model: a pattern string, the shared dimensions, and one config per registered
    block family (``cfg.attention``, ``cfg.mamba``, ... by each family's ``config_key``; TOML tables
    ``[model.attention]``...). Families absent from the pattern keep their defaults and are not validated.

    >>> ModelConfig(pattern="(AE)*2M", d_model=64, moe={"n_experts": 4}).moe.n_experts
    4
    """

    pattern: str = opt("AEMR", "block pattern: one letter per block (see `amer patterns`); '(AE)*2M', 'AEMR@12'")
    d_model: int = opt(128, "residual stream width")
    vocab_size: int = opt(260, "embedding rows (>= 260 for the byte tokenizer)")
    max_seq_len: int = opt(1024, "longest sequence the model accepts (--seq-len must not exceed it)")
    tie_embeddings: bool = opt(True, "share the input embedding and the LM head weights")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    init_std: float = opt(0.02, "std of the normal weight init (residual output projections scaled by 1/sqrt(2 layers))")
    family_configs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, pattern: str = "AEMR", *, family_configs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Shared settings by name, each family's config by its ``config_key`` (a config or a table);
        ``family_configs`` (what ``dataclasses.replace`` passes) gives several at once, named keys win."""
        self.pattern = pattern
        for f in _shared_fields():
            if f.name != "pattern":
                setattr(self, f.name, kwargs.pop(f.name, f.default))
        specs = {s.config_key: s for s in families()}
        given = {**(family_configs or {}), **kwargs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            accepted = [f.name for f in _shared_fields()] + list(specs)
            raise ConfigError(f"unknown model setting '{unknown[0]}'{suggest(unknown[0], accepted)} "
                              f"(accepted: {', '.join(accepted)})")
        self.family_configs = {}
        for key, spec in specs.items():
            value = given.get(key)
            if value is None:
                value = spec.config()
            elif isinstance(value, dict):
                value = from_dict(spec.config, value, where=f"model.{key}.")
            elif not isinstance(value, spec.config):
                raise ConfigError(f"model.{key} must be a {spec.config.__name__} or a table, got {type(value).__name__}")
            self.family_configs[key] = value
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        configs = self.__dict__.get("family_configs")
        if configs is not None and name in configs:
            return configs[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        from amer.pattern import parse_pattern  # local: the parser reads presets that hold model configs

        check(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        self.parsed = parse_pattern(self.pattern)
        dims = self.dims
        for letter in dict.fromkeys(layer.family for layer in self.parsed.layers):
            cfg = self.family_config(letter)
            if hasattr(cfg, "validate"):
                cfg.validate(dims)

    @property
    def n_layers(self) -> int:
        return len(self.parsed.layers)

    @property
    def dims(self) -> Dims:
        return Dims(self.d_model, self.n_layers, self.max_seq_len, self.norm_eps, self.init_std)

    def family_config(self, family: str | FamilySpec) -> Any:
        """The config of ``family`` (a letter, a :class:`~amer.families.Family` or a spec)."""
        spec = family if isinstance(family, FamilySpec) else get_family(str(family))
        return self.family_configs[spec.config_key]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The ``[model]`` table of preset ``name`` (``patterns/<name>.toml``), with top-level overrides."""
        from amer.pattern import load_preset

        data = dict(load_preset(name)["model"])
        data.update(overrides)
        return from_dict(cls, data, where="model.")

    @classmethod
    def _from_dict(cls, data: dict[str, Any], where: str) -> "ModelConfig":
        shared = {f.name: f for f in _shared_fields()}
        hints = typing.get_type_hints(cls)
        specs = {s.config_key: s for s in families()}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            k = key.replace("-", "_")
            if k in shared:
                kwargs[k] = coerce(value, hints[k], f"{where}{k}")
            elif k in specs:
                if isinstance(value, dict):
                    value = from_dict(specs[k].config, value, where=f"{where}{k}.")
                kwargs[k] = value
            else:
                accepted = list(shared) + list(specs)
                raise ConfigError(f"unknown key '{where}{key}'{suggest(k, accepted)} (accepted: {', '.join(accepted)})")
        return cls(**kwargs)

    def _to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in _shared_fields()}
        out.update({key: to_dict(cfg) for key, cfg in self.family_configs.items()})
        return out


def _shared_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ModelConfig) if f.name != "family_configs"]


@dataclass
class STPConfig:
    """Semantic Tube Prediction policy: which taps, how strongly, from when.

    The loss kernel (:func:`amer.stp.compute_stp_loss`) knows none of this; the runtime reads it.
    """

    enabled: bool = opt(False, "turn the STP auxiliary loss on (the taps are chosen by --stp.layers)")
    weight: float = opt(0.02, "STP coefficient once the gate and ramp are passed (total = ce + moe_aux + weight * stp)")
    start_step: int = opt(0, "gate: the STP coefficient is 0 for optimizer steps before this one")
    ramp_steps: int = opt(0, "linear ramp of the STP coefficient from the gate to --stp.weight over this many steps")
    n_spans: int = opt(4, "(s, r, t) triples sampled per sequence per step for the STP loss")
    layers: str | None = opt(None, "taps regularised by STP: comma-separated selectors, e.g. 'A-1,M-1,E-1,R-1', "
                             "'final', 'L7', 'M1:3'; a selector that selects nothing is an error")
    family_weights: dict[str, float] | None = opt(None, "relative STP weight per family, e.g. 'A=1.0,M=0.5' "
                                                  "(others 1.0; keys: family letters, final, embed)")

    def __post_init__(self) -> None:
        check(self.weight >= 0, f"stp.weight must be >= 0, got {self.weight}")
        check(self.start_step >= 0, f"stp.start_step must be >= 0, got {self.start_step}")
        check(self.ramp_steps >= 0, f"stp.ramp_steps must be >= 0, got {self.ramp_steps}")
        check(self.n_spans >= 1, f"stp.n_spans must be >= 1, got {self.n_spans}")
        if self.enabled:
            check(
                bool(self.layers and self.layers.strip()),
                "stp.enabled is true but stp.layers is empty: choose the taps explicitly, "
                "e.g. 'final', 'A-1,M-1,E-1,R-1' or 'L7'",
            )
        if self.family_weights:
            allowed = {*(f.letter for f in families()), "final", "embed"}
            for k, v in self.family_weights.items():
                check(k in allowed, f"stp.family_weights key {k!r} is not one of {sorted(allowed)}{suggest(k, allowed)}")
                check(v >= 0, f"stp.family_weights[{k!r}] must be >= 0, got {v}")


def stp_config_from_preset(name: str) -> STPConfig:
    """The ``[stp]`` table of preset ``name``; a preset without one has STP disabled."""
    from amer.pattern import load_preset

    return from_dict(STPConfig, load_preset(name).get("stp", {}), where="stp.")


@dataclass
class TrainConfig:
    """Everything a training run needs. Resolved from: preset ``[train]`` < ``--config`` TOML < CLI flags."""

    preset: str = opt("small", "named preset in patterns/ giving model dims, STP selection and train defaults")
    pattern: str | None = opt(None, "override the preset's block pattern, e.g. 'AEMEAEMR' or '(AE)*2M'")
    data: str = opt("kjv", "corpus: 'kjv' (bundled King James Bible), 'stdlib' (Python stdlib source), "
                     "or a path to a text file, a directory, a JSONL file with 'text', or chat JSONL")
    steps: int = opt(1000, "optimizer steps to train")
    batch_size: int = opt(16, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    seq_len: int = opt(256, "tokens per training sequence")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only; norms, biases, embeddings exempt)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (0 disables)")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "compute dtype: float32, or bfloat16 autocast")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    seed: int = opt(0, "seed for initialisation, data order and STP span sampling")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation")
    log_interval: int = opt(25, "steps between log lines (JSONL, TensorBoard, metrics)")
    eval_interval: int = opt(250, "steps between validation-loss evaluations (and checkpoints)")
    eval_batches: int = opt(8, "validation batches per evaluation")
    keep_last: int = opt(2, "checkpoints kept besides the best one")
    out_dir: str = opt("checkpoints", "where run directories are created")
    run_name: str | None = opt(None, "run directory name (default: <preset>-<YYYYmmdd-HHMMSS>)")
    resume: str | None = opt(None, "continue a run: a run directory or checkpoint directory")
    max_bad_steps: int = opt(3, "consecutive non-finite losses tolerated before the run stops")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    stp: STPConfig = field(default_factory=STPConfig, metadata={"help": "STP policy"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model config"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_interval", "eval_interval"):
            check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        check(self.seq_len >= 3, f"train.seq_len must be >= 3 (STP needs three positions), got {self.seq_len}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        check(0 < self.val_fraction < 1, f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        check(self.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        check(self.seq_len <= self.model.max_seq_len,
               f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")


class Option(NamedTuple):
    """One settable leaf of a config tree: its dotted key, type, default and help."""

    key: str  # e.g. "model.attention.n_heads"
    type: Any
    default: Any
    help: str


def options(cls: type, prefix: str = "") -> Iterator[Option]:
    """Every scalar setting of config class ``cls``, recursing into nested configs and into each registered
    family's config under ``model``: what the command line turns into flags."""
    hints = typing.get_type_hints(cls)
    fields = _shared_fields() if cls is ModelConfig else dataclasses.fields(cls)
    for f in fields:
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from options(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield Option(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""))
    if cls is ModelConfig:
        for spec in families():
            yield from options(spec.config, f"{prefix}{spec.config_key}.")
