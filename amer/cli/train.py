"""``amer train`` / ``python train.py``: flags generated from the config classes, then the training loop.

The flags the user gave become a nested dict; :mod:`amer.training.resolve` layers it over the preset (or the
resumed run's own config) and ``--config run.toml``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types
import typing
from typing import Any, Literal

from amer.cli.base import ArgParser, run
from amer.config import ConfigError, TrainConfig, options, suggest
from amer.errors import AmerError, StoppedBySignal, StorageError
from amer.fileread import os_error_line

__all__ = ["main", "command", "build_parser", "resolve_config"]

log = logging.getLogger(__name__)


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
                raise argparse.ArgumentTypeError(
                    f"{name} takes KEY=VALUE pairs like 'A=1.0,M=0.5', got {s!r}") from None
        return parse_dict
    if origin is tuple:
        def parse_tuple(s: str) -> tuple[float, ...]:
            try:
                return tuple(float(x) for x in s.split(","))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name} takes comma-separated numbers like '1,16', got {s!r}") from None
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
    p.add_argument("--pattern", help="the block pattern, e.g. 'AEMEAEMR' or '(AE)*2M': the same as --model.pattern")
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
            if {"on", "off"} <= set(kw["choices"]):  # a switch with more settings: the bare flag turns it on
                kw.update(nargs="?", const="on")
                p.add_argument("--no-" + flag[2:], dest=o.key, action="store_const", const="off",
                               help=f"the same as {flag} off")
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


def resolve_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, extras) from the command line, through :func:`amer.training.resolve.resolve_config`.
    Raises ConfigError/PatternError on bad input."""
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
    flags: dict[str, Any] = {}
    for key, value in given.items():
        _set(flags, key, value)
    from amer.training.resolve import resolve_config as layered  # lazy: `amer train --help` stays instant

    cfg = layered(flags, extras["config"])
    if extras["stop_at"] is not None and not 1 <= extras["stop_at"] <= cfg.steps:
        raise ConfigError(f"--stop-at must be between 1 and --steps ({cfg.steps}), got {extras['stop_at']}")
    return cfg, extras


def command(argv: list[str]) -> int:
    """Train; Ctrl-C, SIGTERM and SIGHUP stop after the step in progress with a checkpoint of it and exit with
    128 + the signal's number (see :mod:`amer.training.stopping`); a full disk is one line and exit code 1."""
    from amer.runtime import tune_malloc
    from amer.training.loop import train
    from amer.training.stopping import StopOnSignal

    cfg, extras = resolve_config(argv)
    tune_malloc()  # CLI runs own their process; library callers of train() keep their allocator
    with StopOnSignal(cfg.stop_budget) as stopper:  # handlers, like the allocator, belong to the process owner
        try:
            train(cfg, stop_at=extras["stop_at"])
        except StoppedBySignal as e:
            log.warning(str(e))
            return e.exit_code
        except KeyboardInterrupt:
            log.warning("interrupted: the last written checkpoint is intact; continue with --resume")
            return 128 + (stopper.signum or signal.SIGINT)
        except OSError as e:
            if isinstance(e, AmerError):
                raise
            raise StorageError(f"{os_error_line(e)}; the last written checkpoint is intact: continue with "
                               "--resume once the file system takes writes again") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python train.py`` / ``amer train``. Bad input: one line, exit code 2."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
