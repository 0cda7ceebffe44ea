"""``amer patterns``: the presets (or one pattern) with layers per family and parameter counts, and the
registered block families."""

from __future__ import annotations

import torch

from amer.cli.base import ArgParser
from amer.config import ModelConfig, stp_config_from_preset
from amer.families import families
from amer.model import HybridLM
from amer.pattern import load_preset, preset_names

__all__ = ["command"]


def command(argv: list[str]) -> int:
    p = ArgParser(prog="amer patterns", description="List presets and block families, or describe one pattern/preset.")
    p.add_argument("pattern", nargs="?", help="a pattern string or preset name to describe")
    args = p.parse_args(argv)
    fams = families()
    letters = "/".join(f.letter for f in fams)
    names = [args.pattern] if args.pattern is not None else preset_names()
    print(f"{'name':<10} {'layers':>6} {letters:>12} {'params':>10}  {'stp':<24} pattern")
    for name in names:
        is_preset = args.pattern is None or name in preset_names()
        cfg = ModelConfig.from_preset(name) if is_preset else ModelConfig(pattern=name)
        stp = stp_config_from_preset(name).layers if is_preset else "-"
        with torch.device("meta"):  # never allocates: nam56r is billions of parameters
            model = HybridLM(cfg)
        pat = cfg.parsed
        counts = "/".join(str(pat.count(f.letter)) for f in fams)
        n = model.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        desc = load_preset(name).get("description", "") if is_preset else ""
        print(f"{name:<10} {len(pat):>6} {counts:>12} {size:>10}  {stp or '-':<24} {cfg.pattern}")
        if desc and args.pattern:
            print(f"  {desc}")
    print("\nfamilies:")
    width = max(len(f.config_key) for f in fams) + len("[model.]")
    for f in fams:
        print(f"  {f.letter}  {f.name:<10} {'[model.' + f.config_key + ']':<{width}}  {f.summary}")
    return 0
