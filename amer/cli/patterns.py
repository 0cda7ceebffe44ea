"""``amer patterns``: the presets (or one pattern) with layers per family and parameter counts, and the
registered block families; ``--from-megatron`` / ``--from-layer-types`` print the amer pattern of another code base's
layout (:mod:`amer.translate`)."""

from __future__ import annotations

from pathlib import Path

import torch

from amer.cli.base import ArgParser
from amer.config import ModelConfig, stp_config_from_preset
from amer.errors import InputError
from amer.families import families
from amer.fileread import json_loads, read_file
from amer.model import HybridLM
from amer.pattern import load_preset, preset_names
from amer.translate import from_layer_types, from_megatron

__all__ = ["command"]


def command(argv: list[str]) -> int:
    p = ArgParser(prog="amer patterns", description="List presets and block families, or describe one pattern/preset.")
    p.add_argument("pattern", nargs="?", help="a pattern string or preset name to describe")
    p.add_argument("--from-megatron", metavar="STR", help="print the amer pattern of a Megatron-Core hybrid layer "
                   "pattern ('M-M-M*-|M-M-M*-'; write --from-megatron=-M... for one that starts with '-')")
    p.add_argument("--from-layer-types", metavar="JSON_OR_FILE", help="print the amer pattern of a transformers "
                   "layer-type list (a JSON list) or of a config.json file's layer types")
    p.add_argument("--linear", metavar="LETTER", help="with --from-layer-types: the block letter of "
                   "'linear_attention' layers (default: by the config's model_type)")
    args = p.parse_args(argv)
    if args.from_megatron is not None or args.from_layer_types is not None:
        if args.pattern is not None or (args.from_megatron is not None and args.from_layer_types is not None):
            raise InputError("amer patterns: give one of PATTERN, --from-megatron or --from-layer-types")
        if args.from_megatron is not None:
            print(from_megatron(args.from_megatron))
        else:
            print(from_layer_types(_layer_types(args.from_layer_types), linear=args.linear))
        return 0
    fams = families()
    letters = "/".join(f.letter for f in fams)
    names = [args.pattern] if args.pattern is not None else preset_names()
    w = max(10, *(len(n) for n in names)) if args.pattern is None else 10
    print(f"{'name':<{w}} {'layers':>6} {letters:>18} {'params':>10}  {'stp':<24} pattern")
    for name in names:
        is_preset = args.pattern is None or name in preset_names()
        cfg = ModelConfig.from_preset(name) if is_preset else ModelConfig(pattern=name)
        stp_cfg = stp_config_from_preset(name) if is_preset else None
        stp = "-" if stp_cfg is None else stp_cfg.layers if stp_cfg.enabled else "off"
        with torch.device("meta"):  # never allocates: nam56r is billions of parameters
            model = HybridLM(cfg)
        pat = cfg.parsed
        counts = "/".join(str(pat.count(f.letter)) for f in fams)
        n = model.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        desc = load_preset(name).get("description", "") if is_preset else ""
        print(f"{name:<{w}} {len(pat):>6} {counts:>18} {size:>10}  {stp or '-':<24} {cfg.pattern}")
        if desc and args.pattern:
            print(f"  {desc}")
    print("\nfamilies:")
    width = max(len(f.config_key) for f in fams) + len("[model.]")
    for f in fams:
        print(f"  {f.letter}  {f.name:<10} {'[model.' + f.config_key + ']':<{width}}  {f.summary}")
    return 0


def _layer_types(value: str) -> object:
    """A JSON list given inline, or the config.json (or model folder) it names."""
    path = Path(value)
    if not value.lstrip().startswith("[") and (path.is_file() or (path / "config.json").is_file()):
        path = path if path.is_file() else path / "config.json"
        try:
            return json_loads(read_file(path).decode("utf-8"))
        except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise InputError(f"--from-layer-types: {path} is not readable JSON ({err})") from None
    try:
        return json_loads(value)
    except ValueError:
        raise InputError(f"--from-layer-types: {value!r} is neither a JSON list nor a config.json file") from None
