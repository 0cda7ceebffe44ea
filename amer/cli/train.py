"""``amer train`` / ``python train.py``: flags generated from the config classes, then the training loop.

Config resolution: the preset's ``[train]``, ``[model]`` and ``[stp]`` tables, then ``--config run.toml``,
then command-line flags (or, with ``--resume``, the run's own config instead of the preset).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from amer.cli.base import ArgParser, run
from amer.config import ConfigError, TrainConfig, from_dict, load_toml, options, suggest
from amer.checkpoint import read_meta
from amer.pattern import load_preset
from amer.training.run import locate, resume_config

__all__ = ["main", "command", "build_parser", "resolve_config"]

RESUME_CONFLICTS = ("pattern", "preset", "run_name", "out_dir", "overwrite")


def _parse_value(tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(inner, name)
    if origin is dict:
        def parse_dict(s: str) -> dict[str, float]:
            try:
                return {k.strip(): float(v) for k, v in (kv.split("=") for kv in s.split(",") if kv.strip())}
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} takes KEY=VALUE pairs like 'A=1.0,M=0.5', got {s!r}")
        return parse_dict
    if origin is tuple:
        def parse_tuple(s: str) -> tuple[float, ...]:
            try:
                return tuple(float(x) for x in s.split(","))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} takes comma-separated numbers like '1,16', got {s!r}")
        return parse_tuple
    if origin is Literal:
        return str
    return {int: int, float: float, str: str}.get(tp, str)


def build_parser() -> argparse.ArgumentParser:
    """The ``amer train`` parser, one flag per config field (``--stp.start-step``, ``--model.moe.top-k``...),
    so --help is complete; the block families' flags come from the family registry.

    No defaults are set here (``SUPPRESS``): a flag the user did not give must not override the preset
    or the TOML file. Abbreviations are off: ``--step`` is an error with a suggestion, not a silent
    ``--steps`` that a later flag could make ambiguous.
    """
    p = ArgParser(
        prog="amer train",
        allow_abbrev=False,
        description="Train a hybrid language model with per-family Semantic Tube Prediction. "
                    "Defaults come from the preset (patterns/<preset>.toml); --config TOML overrides it; "
                    "flags override both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML file with train keys at top level and [model] / [stp] tables")
    p.add_argument("--stop-at", type=int, help="stop after this step and checkpoint (the LR schedule still "
                   "targets --steps); continue later with --resume")
    for o in options(TrainConfig):
        flag = "--" + o.key.replace("_", "-")
        help_text = o.help or o.key.replace("_", " ")
        if o.type is bool or typing.get_args(o.type) == (bool,):
            p.add_argument(flag, dest=o.key, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": o.key, "type": _parse_value(o.type, flag), "help": help_text,
                              "metavar": o.key.rsplit(".", 1)[-1].upper()}
        if typing.get_origin(o.type) is Literal:
            kw["choices"] = list(typing.get_args(o.type))
            del kw["metavar"]  # argparse then shows {a,b}: the accepted values
        p.add_argument(flag, **kw)
    return p


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept ``--stp.start_step`` as well as ``--stp.start-step``."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        out.append(a)
    return out


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "family_weights" else v
    return out


def resolve_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, extras) from the command line. Raises ConfigError/PatternError on bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(_normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    if unknown:
        flags = [a for a in parser._option_string_actions if a.startswith("--")]
        bad = unknown[0].split("=")[0]
        if not bad.startswith("-"):
            raise ConfigError(f"unexpected argument {bad!r}: amer train takes only --options (see --help)")
        raise ConfigError(f"unknown option {bad}{suggest(bad, flags)} (see --help)")
    given = vars(args)
    extras = {"stop_at": given.pop("stop_at", None), "config": given.pop("config", None)}
    cli: dict[str, Any] = {}
    for key, value in given.items():
        _set(cli, key, value)

    file_cfg: dict[str, Any] = {}
    if extras["config"]:
        file_cfg = load_toml(extras["config"])
    if given.get("resume"):
        run_dir = locate(given["resume"]).run_dir
        # a resumed run keeps its model and its place: these would be recorded in config.json, not used
        where = {"out_dir": str(run_dir.parent), "run_name": run_dir.name}
        for key in RESUME_CONFLICTS:
            value = cli.get(key, file_cfg.get(key))
            if value is not None and (key not in where or Path(str(value)) != Path(where[key])):
                raise ConfigError(f"--{key.replace('_', '-')} cannot be combined with --resume: the resumed run "
                                  f"keeps its own {key.replace('_', ' ')} (start a new run to change it)")
        # the process layout belongs to the launch, not to the run: a run resumes under any layout
        base = {**{k: v for k, v in resume_config(given["resume"]).items() if k != "parallel"},
                "resume": given["resume"]}
        merged = {**_merge(_merge(base, file_cfg), cli), **where}
    else:
        preset_name = cli.get("preset", file_cfg.get("preset", "small"))
        preset = load_preset(preset_name)
        base = {**preset.get("train", {}), "preset": preset_name, "model": preset["model"], "stp": preset.get("stp", {})}
        merged = _merge(_merge(base, file_cfg), cli)
        if merged.get("init"):
            merged["model"] = _init_model(merged, file_cfg, cli)
        elif merged.get("pattern"):
            merged["model"] = {**merged["model"], "pattern": merged["pattern"]}
    cfg = from_dict(TrainConfig, merged)
    if extras["stop_at"] is not None and not 1 <= extras["stop_at"] <= cfg.steps:
        raise ConfigError(f"--stop-at must be between 1 and --steps ({cfg.steps}), got {extras['stop_at']}")
    return cfg, extras


def _init_model(merged: dict[str, Any], file_cfg: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """``--init``: the model is the checkpoint's (its pattern and shapes), not the preset's; model settings given
    in --config or as flags still apply on top (a shape change then fails when the weights load)."""
    if merged.get("pattern"):
        raise ConfigError("--pattern cannot be combined with --init: the model comes from the --init checkpoint "
                          "(to change blocks of a model, use `amer import SRC OUT --pattern NEW`)")
    model = read_meta(merged["init"])["config"]["model"]
    return _merge(_merge(model, file_cfg.get("model", {})), cli.get("model", {}))


def command(argv: list[str]) -> int:
    from amer.runtime import tune_malloc
    from amer.training.loop import train

    cfg, extras = resolve_config(argv)
    tune_malloc()  # CLI runs own their process; library callers of train() keep their allocator
    try:
        train(cfg, stop_at=extras["stop_at"])
    except KeyboardInterrupt:
        print("interrupted: the last written checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python train.py`` / ``amer train``. Bad input: one line, exit code 2."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
