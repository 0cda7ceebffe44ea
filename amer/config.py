"""Typed configuration: one small dataclass per component (torchtitan style).

Every config can be built from a nested dict (a TOML table) with :func:`from_dict`, which rejects
unknown keys with the closest valid name, and validates itself in ``__post_init__`` so a bad value
fails where it is written, naming the field and what is accepted. Each field carries its ``--help``
text in its metadata (:func:`opt`), so the command line is generated from these classes.

The model's config (:class:`ModelConfig`, :class:`Dims`) lives in :mod:`amer.model_config` and is re-exported
here; each block family's own settings live beside its mixer in ``amer/blocks/`` and are reached through the
family registry.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from amer.configio import check, check_fields, from_dict, load_toml, opt, suggest, to_dict
from amer.errors import ConfigError
from amer.families import families
from amer.model_config import Dims, ModelConfig, shared_fields
from amer.pattern import load_preset

__all__ = [
    "ConfigError", "Dims", "ModelConfig", "STPConfig", "ParallelConfig", "TrainConfig", "stp_config_from_preset",
    "from_dict", "to_dict", "load_toml", "suggest", "check", "opt", "options",
]


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
    stop_budget: float = opt(0.0, "seconds after Ctrl-C, SIGTERM or SIGHUP within which the checkpoint of the step "
                             "in progress must be written; past them the run stops at once, keeping the last "
                             "complete checkpoint (0: no limit)")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    curves: bool = opt(True, "draw curves.png (losses, STP, curvature, speed) in the run directory at every evaluation")
    activation_checkpointing: Literal["none", "blocks", "selective"] = opt(
        "none", "recompute activations in backward to save memory: 'blocks' (each block keeps only its input), "
        "'selective' (every other block)")
    compile: Literal["auto", "on", "off"] = opt(
        "auto", "torch.compile each block (regional, fullgraph; a block that cannot compile whole stays eager and says "
        "why): 'auto' compiles when the steps left pay the warm-up back (measured; see docs/benchmarks.md), 'on' "
        "always, 'off' never; a bare --compile means 'on'")
    stp: STPConfig = field(default_factory=STPConfig, metadata={"help": "STP policy"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "scale-out layout"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model config"})

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        for name in ("data", "out_dir", "resume", "preset", "init"):  # paths: the OS refuses a NUL with a traceback
            check("\x00" not in (getattr(self, name) or ""), f"train.{name} must not contain a NUL character")
        for name in ("data", "out_dir", "resume", "init"):  # "" would quietly mean the working directory
            check(getattr(self, name) != "", f"train.{name} must not be empty: give a path"
                  + (" or a corpus name ('kjv', 'stdlib')" if name == "data" else ""))
        if self.run_name is not None:
            check(_plain_name(self.run_name), f"train.run_name must be a plain directory name (letters, digits, "
                  f"'_', '-', '+', '.'; no '/', not starting with '.' or '-'), got {self.run_name!r}")
        check(self.seq_len <= self.model.max_seq_len,
               f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
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
    fields = shared_fields() if cls is ModelConfig else dataclasses.fields(cls)
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
