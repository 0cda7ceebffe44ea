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
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from amer.configio import check, check_fields, coerce, from_dict, load_toml, opt, suggest, to_dict
from amer.errors import ConfigError
from amer.families import FamilySpec, families, get_family
from amer.pattern import load_preset, parse_pattern

__all__ = [
    "ConfigError", "Dims", "ModelConfig", "STPConfig", "ParallelConfig", "TrainConfig", "stp_config_from_preset",
    "from_dict", "to_dict", "load_toml", "suggest", "check", "opt", "options",
]


class Dims(NamedTuple):
    """The dimensions every mixer shares (a family's own settings come in its own config)."""

    d_model: int  # residual stream width
    n_layers: int  # depth of the whole stack (for residual-scaled initialisation)
    max_seq_len: int  # longest sequence the model accepts
    norm_eps: float  # RMSNorm epsilon
    init_std: float  # std of the normal weight init
    residual_scale: float = 1.0  # multiplier of every block's update (Granite's residual_multiplier)
    norm_offset: float = 0.0  # RMSNorm gain = offset + weight (Gemma: 1)

    @property
    def out_std(self) -> float:
        """GPT-2 residual scaling: projections that write into the residual stream get std / sqrt(2L)."""
        return self.init_std / (2 * max(1, self.n_layers)) ** 0.5


@dataclass(init=False, frozen=True)
class ModelConfig:
    """A hybrid language model: a pattern string, the shared dimensions, and one config per registered
    block family (``cfg.attention``, ``cfg.mamba``, ... by each family's ``config_key``; TOML tables
    ``[model.attention]``...). Families absent from the pattern keep their defaults and are not validated.

    >>> ModelConfig(pattern="(AE)*2M", d_model=64, moe={"n_experts": 4}).moe.n_experts
    4
    """

    pattern: str = opt("AEMR", "block pattern: one letter per block (see `amer patterns`); '(AE)*2M', 'AEMR@12'")
    d_model: int = opt(128, "residual stream width", ge=1)
    vocab_size: int = opt(260, "embedding rows; amer train sets it from --tokenizer (byte: 260, others: their size "
                          "rounded up to a multiple of 64), replacing a preset's or flag's value", ge=2)
    max_seq_len: int = opt(1024, "longest sequence the model accepts (--seq-len must not exceed it)", ge=1)
    tie_embeddings: bool = opt(True, "share the input embedding and the LM head weights")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon", gt=0)
    init_std: float = opt(0.02,
                          "std of the normal weight init (residual output projections scaled by 1/sqrt(2 layers))")
    # what imported checkpoints use (1 / 0 / None leave the model as it is)
    embed_scale: float = opt(1.0, "multiplier of the token embeddings (Gemma: sqrt(d-model))")
    residual_scale: float = opt(1.0, "multiplier of every block's update before it joins the residual stream")
    logit_scale: float = opt(1.0, "multiplier of the logits (Granite: 1 / logits_scaling)")
    logit_softcap: float | None = opt(None, "cap the logits smoothly to (-c, c) as c * tanh(logits / c)", gt=0)
    norm_offset: float = opt(0.0, "every RMSNorm's gain is norm-offset + weight (Gemma's 1 + w)")
    family_configs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, pattern: str = "AEMR", *, family_configs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Shared settings by name, each family's config by its ``config_key`` (a config or a table);
        ``family_configs`` (what ``dataclasses.replace`` passes) gives several at once, named keys win."""
        # frozen: the fields are set once, here, through object.__setattr__
        object.__setattr__(self, "pattern", pattern)
        for f in _shared_fields():
            if f.name != "pattern":
                object.__setattr__(self, f.name, kwargs.pop(f.name, f.default))
        specs = {s.config_key: s for s in families()}
        given = {**(family_configs or {}), **kwargs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            accepted = [f.name for f in _shared_fields()] + list(specs)
            raise ConfigError(f"unknown model setting '{unknown[0]}'{suggest(unknown[0], accepted)} "
                              f"(accepted: {', '.join(accepted)})")
        configs: dict[str, Any] = {}
        for key, spec in specs.items():
            value = given.get(key)
            if value is None:
                value = spec.config()
            elif isinstance(value, dict):
                value = from_dict(spec.config, value, where=f"model.{key}.")
            elif not isinstance(value, spec.config):
                raise ConfigError(f"model.{key} must be a {spec.config.__name__} or a table (in TOML a [model.{key}] "
                                  f"section with keys), got {type(value).__name__} {value!r:.40}")
            configs[key] = value
        object.__setattr__(self, "family_configs", configs)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        configs = self.__dict__.get("family_configs")
        if configs is not None and name in configs:
            return configs[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        for key, cfg in self.family_configs.items():  # a family's own checks cannot see NaN or infinity
            check_fields(cfg, f"model.{key}.")
        object.__setattr__(self, "parsed", parse_pattern(self.pattern))
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
        return Dims(self.d_model, self.n_layers, self.max_seq_len, self.norm_eps, self.init_std, self.residual_scale,
                    self.norm_offset)

    def family_config(self, family: str | FamilySpec) -> Any:
        """The config of ``family`` (a letter, a :class:`~amer.families.Family` or a spec)."""
        spec = family if isinstance(family, FamilySpec) else get_family(str(family))
        return self.family_configs[spec.config_key]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The ``[model]`` table of preset ``name`` (``patterns/<name>.toml``), with top-level overrides."""
        data = dict(load_preset(name)["model"])
        data.update(overrides)
        return from_dict(cls, data, where="model.")

    @classmethod
    def _from_dict(cls, data: dict[str, Any], where: str) -> ModelConfig:
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


@dataclass(frozen=True)
class STPConfig:
    """Semantic Tube Prediction policy: which taps, how strongly, from when.

    The loss kernel (:func:`amer.stp.compute_stp_loss`) knows none of this; the runtime reads it.
    """

    enabled: bool = opt(False, "turn the STP auxiliary loss on (the taps are chosen by --stp.layers)")
    weight: float = opt(0.02, "STP coefficient once the gate and ramp are passed (total = ce + aux + weight * stp)")
    start_step: int = opt(0, "gate: the STP coefficient is 0 for optimizer steps before this one")
    ramp_steps: int = opt(0, "linear ramp of the STP coefficient from the gate to --stp.weight over this many steps")
    form: Literal["triple", "span"] = opt("triple", "STP loss form: triple (bend of random (s, r, t) triples) or span "
                                          "(one patch vs its complement, the STP paper's released random_span)")
    n_spans: int = opt(4, "triples (or patches, --stp.form span) sampled per sequence per step for the STP loss", ge=1)
    layers: str | None = opt(None, "taps regularised by STP: comma-separated selectors, e.g. 'A-1,M-1,E-1,R-1', "
                             "'final', 'L7', 'M1:3'; a selector that selects nothing is an error")
    family_weights: dict[str, float] | None = opt(None, "relative STP weight per family, e.g. 'A=1.0,M=0.5' "
                                                  "(others 1.0; keys: family letters, final, embed)")

    def __post_init__(self) -> None:
        check_fields(self, "stp.")
        check(self.form in ("triple", "span"), f"stp.form must be 'triple' or 'span', got {self.form!r}")
        if self.enabled:
            check(
                bool(self.layers and self.layers.strip()),
                "stp.enabled is true but stp.layers is empty: choose the taps explicitly, "
                "e.g. 'final', 'A-1,M-1,E-1,R-1' or 'L7'",
            )
        if self.family_weights:
            allowed = {*(f.letter for f in families()), "final", "embed"}
            for k in self.family_weights:
                check(k in allowed,
                      f"stp.family_weights key {k!r} is not one of {sorted(allowed)}{suggest(k, allowed)}")


def stp_config_from_preset(name: str) -> STPConfig:
    """The ``[stp]`` table of preset ``name``; a preset without one has STP disabled."""
    return from_dict(STPConfig, load_preset(name).get("stp", {}), where="stp.")


@dataclass(frozen=True)
class ParallelConfig:
    """How a ``torchrun`` launch splits the work: data parallel ranks times pipeline stages (world size); expert
    parallelism splits the data-parallel ranks further for the experts."""

    dp: int = opt(1, "data-parallel ranks: each reads a disjoint share of every global batch", ge=1)
    pp: int = opt(1, "pipeline stages, cut at the pattern's '|' marks (must equal their number + 1)", ge=1)
    ep: int = opt(1, "expert-parallel ranks: the experts of every expert block are split over groups of this many "
                  "data-parallel ranks, tokens reach them by all-to-all (divides --parallel.dp; FSDP2 only)", ge=1)
    data: Literal["fsdp", "ddp"] = opt("fsdp", "data-parallel engine: fsdp (FSDP2 fully_shard) or ddp")
    microbatches: int | None = opt(None, "pipeline microbatches per micro-batch (divides the per-rank batch; "
                                   "default: one per stage)", ge=1)
    schedule: Literal["1f1b", "gpipe"] = opt("1f1b", "pipeline schedule: 1f1b or gpipe")

    def __post_init__(self) -> None:
        check_fields(self, "parallel.")
        check(self.data in ("fsdp", "ddp"), f"parallel.data must be 'fsdp' or 'ddp', got {self.data!r}")
        check(self.schedule in ("1f1b", "gpipe"), f"parallel.schedule must be '1f1b' or 'gpipe', got {self.schedule!r}")
        check(self.dp % self.ep == 0, f"--parallel.ep {self.ep} must divide --parallel.dp {self.dp}: the experts are "
              "split over groups of data-parallel ranks")
        check(self.ep == 1 or self.data == "fsdp", "--parallel.ep needs --parallel.data fsdp (the expert weights are "
              "left out of the data-parallel sharding, which DDP cannot do)")
        check(self.schedule != "1f1b" or self.n_microbatches >= self.pp,
              f"parallel.schedule 1f1b needs at least as many microbatches as stages ({self.pp}), got "
              f"{self.n_microbatches}; raise --parallel.microbatches or use --parallel.schedule gpipe")

    @property
    def n_microbatches(self) -> int:
        return self.pp if self.microbatches is None else self.microbatches

    @property
    def world(self) -> int:
        return self.dp * self.pp


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Resolved from: preset ``[train]`` < ``--config`` TOML < CLI flags."""

    preset: str = opt("small", "named preset in patterns/ giving model dims, STP selection and train defaults")
    data: str = opt("kjv", "corpus: 'kjv' (bundled King James Bible), 'stdlib' (Python stdlib source), "
                     "or a path to a text file, a directory, a JSONL file with 'text', or chat JSONL")
    tokenizer: str = opt("byte", "'byte' (UTF-8 bytes), 'bpe:N' (byte-level BPE of N tokens trained on the training "
                         "split at start-up) or a Hugging Face tokenizer.json; sets model.vocab_size")
    steps: int = opt(1000, "optimizer steps to train", ge=1)
    batch_size: int = opt(16, "sequences per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", ge=1)
    seq_len: int = opt(256, "tokens per training sequence (STP needs three positions)", ge=3)
    packing: Literal["documents", "none"] = opt(
        "documents", "packed rows: 'documents' keeps every block inside each document (attention mask, "
        "state resets); 'none' lets blocks run across document boundaries")
    lr: float = opt(3e-3, "peak learning rate (AdamW)", gt=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)", le=1)
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only; norms, biases, embeddings exempt)")
    beta1: float = opt(0.9, "AdamW beta1", lt=1)
    beta2: float = opt(0.95, "AdamW beta2", lt=1)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (0 disables)")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "compute dtype: float32, or bfloat16 autocast")
    device: str = opt("cpu", "cpu, cuda, cuda:N, xla (torch_xla) or auto")
    seed: int = opt(0, "seed for initialisation, data order and STP span sampling")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation", gt=0, lt=1)
    log_interval: int = opt(25, "steps between log lines (JSONL, TensorBoard, metrics)", ge=1)
    eval_interval: int = opt(250, "steps between validation-loss evaluations (and checkpoints)", ge=1)
    eval_batches: int = opt(8, "validation batches per evaluation", ge=1)
    keep_last: int = opt(2, "checkpoints kept besides the best one", ge=1)
    out_dir: str = opt("checkpoints", "where run directories are created")
    run_name: str | None = opt(None, "run directory name, a plain name inside --out-dir "
                               "(default: <preset>-<YYYYmmdd-HHMMSS>)")
    resume: str | None = opt(None, "continue a run amer train created: its directory (latest checkpoint, or step 0 "
                             "if it has none) or one of its checkpoint directories")
    init: str | None = opt(None, "start from these weights and their model config (a checkpoint, run directory or "
                           "pretrained folder) with a fresh optimizer and schedule: fine-tuning")
    overwrite: bool = opt(False, "start the run afresh in an existing run directory amer train created, deleting "
                          "its checkpoints and logs (files amer did not write are kept)")
    max_bad_steps: int = opt(3, "consecutive non-finite losses tolerated before the run stops", ge=1)
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    curves: bool = opt(True, "draw curves.png (losses, STP, curvature, speed) in the run directory at every evaluation")
    activation_checkpointing: Literal["none", "blocks", "selective"] = opt(
        "none", "recompute activations in backward to save memory: 'blocks' (each block keeps only its input), "
        "'selective' (every other block)")
    compile: bool = opt(False, "torch.compile each block (regional, fullgraph; dropless MoE blocks stay eager)")
    stp: STPConfig = field(default_factory=STPConfig, metadata={"help": "STP policy"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "scale-out layout"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model config"})

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        for name in ("data", "out_dir", "resume", "preset", "init"):  # paths: the OS refuses a NUL with a traceback
            check("\x00" not in (getattr(self, name) or ""), f"train.{name} must not contain a NUL character")
        if self.run_name is not None:
            check(_plain_name(self.run_name), f"train.run_name must be a plain directory name (letters, digits, "
                  f"'_', '-', '+', '.'; no '/', not starting with '.' or '-'), got {self.run_name!r}")
        check(self.seq_len <= self.model.max_seq_len,
               f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        check(not (self.compile and self.activation_checkpointing != "none"), "train.compile cannot be combined with "
              "train.activation_checkpointing yet (the recomputation re-traces a different graph); use one of them")
        self._check_parallel()

    def _check_parallel(self) -> None:
        """The layout fits the pattern and the batch (checked before any process waits for another)."""
        par = self.parallel
        check(self.batch_size % par.dp == 0, f"--batch-size {self.batch_size} (the global batch) must be divisible "
              f"by --parallel.dp {par.dp}: each data-parallel rank reads an equal share")
        if par.pp > 1:
            stages = self.model.parsed.n_stages
            check(stages == par.pp, f"--parallel.pp {par.pp} needs a pattern of {par.pp} stages, but "
                  f"{self.model.parsed.letters!r} has {stages} (cut it into stages with '|', e.g. 'AEME|AEMR')")
            rows = self.batch_size // par.dp
            check(rows % par.n_microbatches == 0, f"--parallel.microbatches {par.n_microbatches} must divide the "
                  f"{rows} rows each pipeline runs per micro-batch (--batch-size / --parallel.dp)")


def _plain_name(name: str) -> bool:
    """A name that stays inside --out-dir: one path component, no '..', nothing hidden, no control characters."""
    return 0 < len(name) <= 200 and re.fullmatch(r"\w[\w.+-]*", name) is not None


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
