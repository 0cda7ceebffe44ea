"""The ``amer`` console script: one module per command, one parser class, one error base -> exit codes.

Bad input prints one line and exits with code 2 (no traceback). Nothing below this package imports it.
"""

from __future__ import annotations

import importlib
import sys

from amer.cli.base import fail, run
from amer.configio import suggest

__all__ = ["main", "COMMANDS"]

# command -> (module in amer.cli, one-line description)
COMMANDS = {
    "train": ("train", "train a hybrid model (python train.py is the same); amer train --help"),
    "sample": ("sample", "generate text from a checkpoint with the decoding caches"),
    "patterns": ("patterns", "list the presets (pattern, layers per family, parameters, STP selection) and families"),
    "plan": ("plan", "predict per-rank memory and FLOPs of a training layout, and the smallest layout that fits"),
    "export": ("export", "write a checkpoint as a pretrained folder (config.json, model.safetensors, tokenizer.json)"),
    "curvature": ("curvature", "measure token and depth curvature per family and block boundary"),
    "plot": ("plot", "training curves of one or several runs overlaid (loss, STP, curvature, tokens/s) as a PNG"),
    "bench": ("bench", "benchmarks: blocks, stp, taps, scaling, flops, peers, all (amer bench --help)"),
    "import": ("import_",
               "import a transformers checkpoint folder (Llama, Mixtral, Mamba-2, hybrids) as an amer model"),
    "experiment": ("experiment", "reproductions built on amer: nlrx (STP on NL-RX-SYNTH); amer experiment nlrx --help"),
}


def usage() -> str:
    lines = ["usage: amer <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        hint = suggest(cmd, COMMANDS, cutoff=0.6)
        return fail(f"unknown command '{cmd}'{hint} (commands: {', '.join(COMMANDS)})")
    module = importlib.import_module(f"amer.cli.{COMMANDS[cmd][0]}")
    return run(module.command, rest)


if __name__ == "__main__":
    sys.exit(main())
