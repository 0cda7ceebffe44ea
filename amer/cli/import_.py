"""``amer import SRC OUT``: a transformers checkpoint folder in, an amer pretrained folder out (same logits).

``--pattern`` performs hybrid surgery: blocks whose letter is unchanged keep their imported weights,
replaced ones start fresh (``amer train --init OUT`` then fine-tunes, e.g. with STP).
"""

from __future__ import annotations

from typing import Any

from amer.cli.base import ArgParser, UsageError
from amer.configio import number_arg, path_arg
from amer.fileread import json_loads

__all__ = ["command"]


def _settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["mamba.head_dim=16"]`` -> ``{"mamba": {"head_dim": 16}}`` (values read as JSON where they parse)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        family, dot, name = key.partition(".")
        if not (sep and dot and family and name):
            raise UsageError(f"--set {item!r}: expected FAMILY.FIELD=VALUE, e.g. mamba.head_dim=16")
        try:
            parsed = json_loads(value)
        except ValueError:
            parsed = value
        out.setdefault(family, {})[name.replace("-", "_")] = parsed
    return out


def command(argv: list[str]) -> int:
    from amer.interop import DTYPES, import_pretrained, supported_classes

    p = ArgParser(prog="amer import", description="Import a transformers checkpoint folder (config.json + "
                  "safetensors, read from disk) as an amer pretrained folder. Supported classes: "
                  + ", ".join(supported_classes()))
    p.add_argument("src", type=path_arg,
                   help="transformers model folder (or a file inside it)")
    p.add_argument("out", type=path_arg,
                   help="amer pretrained folder to write (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--pattern", default=None,
                   help="new pattern of the same depth: unchanged letters keep their imported weights, "
                        "changed ones are initialised fresh (e.g. turn every second A of '(AE)*4' into M)")
    p.add_argument("--set", action="append", default=[], metavar="FAMILY.FIELD=VALUE",
                   help="config of a family the new pattern brings in, e.g. --set mamba.head_dim=16 (repeatable)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    p.add_argument("--seed", type=number_arg(True, ge=0), default=0, help="seed of the fresh blocks' initialisation")
    args = p.parse_args(argv)
    if args.set and args.pattern is None:
        raise UsageError("--set configures the families a new --pattern brings in; give --pattern too")
    _, cfg, summary = import_pretrained(args.src, args.out, pattern=args.pattern, dtype=args.dtype, seed=args.seed,
                                        family_configs=_settings(args.set))
    line = f"imported {summary['source_class']} -> {args.out}: pattern {cfg.pattern}, {len(cfg.parsed.layers)} blocks"
    if args.pattern is not None:
        fresh = ", ".join(summary["fresh"]) or "none"
        line += f", {len(summary['kept'])} kept, {len(summary['fresh'])} fresh ({fresh})"
    print(line)
    return 0
