"""The one place a run's configuration is resolved, before training starts; the loop receives the frozen result.

:func:`resolve_config` layers the settings, lowest first: the preset's ``[train]``, ``[model]`` and ``[stp]``
tables (with ``--resume``: the run's own saved config instead; with ``--init``: the model saved with those
weights instead of the preset's), then the ``--config`` TOML file, then the command-line flags.

:func:`resolve_run` settles what only the run can: its directory and the checkpoint it continues from, the
tokenizer (a resumed run's or ``--init``'s saved one, never retrained; otherwise the one ``--tokenizer`` names,
``bpe:N`` trained on the training split) and with it the vocabulary, and the data. The :class:`Run` it returns
is frozen: the loop reads it and never rewrites it, and ``run.record`` is what ``config.json`` and every
checkpoint's ``meta.json`` hold (so ``--resume`` starts from exactly this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from amer.checkpoint import find_checkpoint, read_meta
from amer.config import TrainConfig, from_dict, load_toml
from amer.data import (
    NAMED_CORPORA,
    DataSplits,
    build_datasets,
    check_spec,
    load_tokenizer,
    make_tokenizer,
    model_vocab_size,
)
from amer.data.packing import DataConfig
from amer.errors import CheckpointError, ConfigError
from amer.fileread import json_loads, read_file
from amer.pattern import load_preset
from amer.training import scaleout
from amer.training.distributed import Layout
from amer.training.run import Target, claim, config_record, locate, resume_config
from amer.training.runlock import RunLock

__all__ = ["Run", "resolve_config", "resolve_run", "RESUME_CONFLICTS"]

# what a resumed run keeps: its model, its place (changing them would not continue the run)
RESUME_CONFLICTS = ("model.pattern", "preset", "run_name", "out_dir", "overwrite")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(k)  # type: ignore[assignment]
    return d


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                         dict) and k != "family_weights" else v
    return out


def _saved(config: dict[str, Any]) -> dict[str, Any]:
    """A saved run config as this version reads it: runs written before the pattern had one home (the model's)
    carry a train-level ``pattern``, already folded into ``model.pattern`` when they were resolved."""
    return {k: v for k, v in config.items() if k != "pattern"}


def _pattern_home(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """A layer with a top-level ``pattern`` (the ``--pattern`` flag, a TOML file's ``pattern = ...``) moved to
    ``model.pattern``, its one home."""
    if "pattern" not in layer:
        return layer
    model = layer.get("model", {})
    if isinstance(model, dict) and "pattern" in model:
        raise ConfigError(f"{where} gives the pattern twice (pattern and model.pattern are the same setting)")
    return {**{k: v for k, v in layer.items() if k != "pattern"},
            "model": {**(model if isinstance(model, dict) else {}), "pattern": layer["pattern"]}}


_PATHS = ("data", "tokenizer", "init", "out_dir")  # settings that may name a file or folder


def _absolute(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer whose paths are absolute: what the user meant where they typed them, so a run resumed from another
    working directory still finds its data (names such as ``kjv``, ``bpe:8192`` stay names)."""
    out = dict(layer)
    for key in _PATHS:
        value = out.get(key)
        named = value in NAMED_CORPORA if key == "data" else (
            value == "byte" or str(value).startswith("bpe:") if key == "tokenizer" else False)
        if isinstance(value, str) and value and "\0" not in value and not named:
            out[key] = os.path.abspath(os.path.expanduser(value))
    return out


def resolve_config(flags: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """The run's :class:`TrainConfig` from the given command-line values (a nested dict of only the flags the
    user gave, e.g. ``{"steps": 10, "stp": {"layers": "M-1"}}``) and an optional TOML file. Raises
    :class:`~amer.errors.ConfigError` / :class:`~amer.errors.PatternError` on bad input."""
    flags = _absolute(_pattern_home(flags, "the command line"))
    file_cfg = _absolute(_pattern_home(load_toml(config_file), f"--config {config_file}")) if config_file else {}
    resume = flags.get("resume", file_cfg.get("resume"))
    if isinstance(resume, str) and "\x00" in resume:  # the OS refuses a NUL with a traceback
        raise ConfigError("train.resume must not contain a NUL character")
    if resume:
        run_dir = locate(resume).run_dir
        where = {"out_dir": os.path.abspath(run_dir.parent), "run_name": run_dir.name}
        for key in RESUME_CONFLICTS:
            value = _get(flags, key)
            value = _get(file_cfg, key) if value is None else value
            if value is not None and (key not in where or Path(str(value)) != Path(where[key])):
                flag = "--pattern" if key == "model.pattern" else f"--{key.replace('_', '-')}"
                raise ConfigError(f"{flag} cannot be combined with --resume: the resumed run keeps its own "
                                  f"{key.rsplit('.', 1)[-1].replace('_', ' ')} (start a new run to change it)")
        # the process layout belongs to the launch, not to the run: a run resumes under any layout
        base = {k: v for k, v in _saved(resume_config(resume)).items() if k != "parallel"}
        merged = {**_merge(_merge({**base, "resume": resume}, file_cfg), flags), **where}
        return from_dict(TrainConfig, merged)
    preset_name = flags.get("preset", file_cfg.get("preset", "small"))
    preset = load_preset(preset_name)
    base = {**preset.get("train", {}), "preset": preset_name, "model": preset["model"], "stp": preset.get("stp", {})}
    merged = _merge(_merge(base, file_cfg), flags)
    init = merged.get("init")
    if init:
        if _get(flags, "model.pattern") is not None or _get(file_cfg, "model.pattern") is not None:
            raise ConfigError("--pattern cannot be combined with --init: the model comes from the --init checkpoint "
                              "(to change blocks of a model, use `amer import SRC OUT --pattern NEW`)")
        # the model is the checkpoint's (its pattern and shapes); model settings given in --config or as flags
        # still apply on top (a shape change then fails when the weights load)
        saved = read_meta(init)["config"]["model"]
        merged["model"] = _merge(_merge(saved, file_cfg.get("model", {})), flags.get("model", {}))
    return from_dict(TrainConfig, merged)


@dataclass(frozen=True)
class Run:
    """A run, resolved: its final config (vocabulary and tokenizer settled), where it goes, its tokenizer and
    its data."""

    config: TrainConfig
    target: Target
    tokenizer: Any
    data: DataSplits
    lock: RunLock | None = field(default=None, compare=False, repr=False)  # rank 0's hold on the run directory

    @property
    def record(self) -> dict[str, Any]:
        """The config as ``config.json`` and each checkpoint record it: what ``--resume`` starts from."""
        return config_record(self.config)

    def release(self) -> None:
        """Let the next run into the directory (the process ending does it too)."""
        if self.lock is not None:
            self.lock.release()


def resolve_run(cfg: TrainConfig, layout: Layout) -> Run:
    """Settle the run's directory, tokenizer, vocabulary and data (on every rank; rank 0 checks the directory and
    takes its lock before any slow work, so a clash, a foreign directory or a run still training there fails at
    once). The caller releases the returned run's lock (:meth:`Run.release`)."""
    held: list[RunLock] = []

    def claimed() -> Target:
        target, lock = claim(cfg)
        held.append(lock)  # stays on rank 0: a lock is a file descriptor, not something to send to other ranks
        return target

    target = scaleout.on_main(layout, claimed)
    try:
        spec, saved = _saved_tokenizer(cfg, target)
        data = build_datasets(DataConfig(cfg.data, cfg.seq_len, cfg.val_fraction, cfg.seed),
                              saved or (lambda train_docs: make_tokenizer(spec, train_docs)))
        tok = data.train.tokenizer
        model = cfg.model if saved is not None else replace(cfg.model, vocab_size=model_vocab_size(tok))
        if model.vocab_size < tok.vocab_size:
            raise ConfigError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's "
                              f"{tok.vocab_size} tokens")
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return Run(replace(cfg, model=model, tokenizer=spec), target, tok, data, held[0] if held else None)


def _saved_tokenizer(cfg: TrainConfig, target: Target) -> tuple[str, Any]:
    """``(spec, tokenizer)``: the tokenizer a run must reuse, or None when it is made from ``--tokenizer`` now.

    A resumed run reuses the one saved with its checkpoint (or in its directory when it has none yet), never
    a retrained one; ``--init`` reuses the one saved with those weights (its spec becomes that file). A
    resumed run's ``--tokenizer`` cannot change; a new one is checked here, before any slow work.
    """
    if target.resume:
        try:
            was = json_loads(read_file(target.run_dir / "config.json")).get("tokenizer", "byte")
        except (OSError, ValueError, AttributeError):
            was = cfg.tokenizer
        if cfg.tokenizer != was:
            raise ConfigError(f"--tokenizer {cfg.tokenizer} differs from the run's own ({was}); a resumed run keeps "
                              f"its tokenizer: drop --tokenizer, or start a new run")
        where = target.checkpoint if target.checkpoint is not None else target.run_dir
        if (where / "tokenizer.json").is_file():
            return cfg.tokenizer, load_tokenizer(where)
        if target.checkpoint is not None:
            if cfg.tokenizer != "byte":
                raise CheckpointError(f"{target.checkpoint} has no tokenizer.json but the run used --tokenizer "
                                      f"{cfg.tokenizer}; copy the run's tokenizer.json into it")
            return cfg.tokenizer, load_tokenizer(where)  # a checkpoint from before tokenizers were saved: bytes
    elif cfg.init:
        src = find_checkpoint(cfg.init)
        tok = load_tokenizer(src)
        return ("byte" if tok.spec == "byte" else str(src / "tokenizer.json")), tok
    check_spec(cfg.tokenizer)
    return cfg.tokenizer, None
