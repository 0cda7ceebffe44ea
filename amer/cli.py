"""The ``amer`` console script: ``train``, ``sample``, ``patterns``, ``curvature``, ``bench``.

Bad input prints one line and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
import typing

__all__ = ["main"]

USAGE = """usage: amer <command> [options]

commands:
  train      train a hybrid model (python train.py is the same); amer train --help
  sample     generate text from a checkpoint with the decoding caches
  patterns   list the presets in patterns/ (pattern, layers, parameters, STP selection)
  curvature  measure token and depth curvature per family and block boundary
  bench      benchmarks: blocks, stp, taps, scaling, flops, peers, all (amer bench --help)
  experiment reproductions built on amer: nlrx (STP on NL-RX-SYNTH); amer experiment nlrx --help
"""


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block and exiting: bad input is one line."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        from amer.config import ConfigError

        raise ConfigError(f"{self.prog}: {message} (see --help)")


def cmd_patterns(argv: list[str]) -> int:
    p = OneLineParser(prog="amer patterns", description="List presets, or describe one pattern/preset.")
    p.add_argument("pattern", nargs="?", help="a pattern string or preset name to describe")
    args = p.parse_args(argv)
    import torch

    from amer.config import ModelConfig, stp_config_from_preset
    from amer.model import HybridLM
    from amer.pattern import load_preset, parse_pattern, preset_names

    names = [args.pattern] if args.pattern else preset_names()
    print(f"{'name':<10} {'layers':>6} {'A/M/E/R':>12} {'params':>10}  {'stp':<24} pattern")
    for name in names:
        try:
            is_preset = not args.pattern or name in preset_names()
            cfg = ModelConfig.from_preset(name) if is_preset else ModelConfig(pattern=name)
            stp = stp_config_from_preset(name).layers if is_preset else "-"
        except ValueError as e:
            return _fail(str(e))
        with torch.device("meta"):  # never allocates: nam56r is billions of parameters
            model = HybridLM(cfg)
        pat = parse_pattern(cfg.pattern)
        counts = "/".join(str(pat.count(f)) for f in "AMER")
        n = model.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        desc = load_preset(name).get("description", "") if is_preset else ""
        print(f"{name:<10} {len(pat):>6} {counts:>12} {size:>10}  {stp or '-':<24} {cfg.pattern}")
        if desc and args.pattern:
            print(f"  {desc}")
    return 0


def cmd_sample(argv: list[str]) -> int:
    p = OneLineParser(prog="amer sample", description="Generate text from a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (latest step)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (stops early at EOS)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        return _fail(f"--top-k must be >= 1, got {args.top_k}")
    import torch

    from amer.checkpoint import CheckpointError, load_checkpoint
    from amer.data import ByteTokenizer
    from amer.train import resolve_device

    try:
        device = resolve_device(args.device)
        model, cfg = load_checkpoint(args.checkpoint, device=device)
    except (CheckpointError, ValueError) as e:  # ConfigError (bad --device) is a ValueError
        return _fail(str(e))
    args.device = device
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode(args.prompt)
    prompt = torch.tensor([ids], device=args.device)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    if device.type == "cpu":
        # batch-1 decoding is a chain of tiny matmuls: extra intra-op threads only add synchronisation
        # (measured 128 vs 4 tokens/s on a busy 2-core machine)
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=gen, eos_id=tok.eos_id)
    dt = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {dt:.2f}s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from amer.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        return _dispatch(argv[0], argv[1:])
    except SystemExit as e:  # --help of a subcommand: printed already; return rather than exit
        return int(e.code or 0) if not isinstance(e.code, str) else _fail(e.code)
    except ConfigError as e:  # OneLineParser's errors: one line, exit 2
        return _fail(str(e))


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "train":
        from amer.train import main as train_main

        return train_main(rest)
    if cmd == "sample":
        return cmd_sample(rest)
    if cmd == "patterns":
        return cmd_patterns(rest)
    if cmd == "curvature":
        from amer.curvature import main as curvature_main

        return curvature_main(rest)
    if cmd == "bench":
        from amer.bench import main as bench_main

        return bench_main(rest)
    if cmd == "experiment":
        return cmd_experiment(rest)
    import difflib

    close = difflib.get_close_matches(cmd, ["train", "sample", "patterns", "curvature", "bench", "experiment"], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return _fail(f"unknown command '{cmd}'{hint} (commands: train, sample, patterns, curvature, bench, experiment)")


def cmd_experiment(argv: list[str]) -> int:
    """``amer experiment NAME ...`` -> ``amer.experiments.NAME.main(...)``."""
    from amer.experiments import EXPERIMENTS

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: amer experiment {{{','.join(EXPERIMENTS)}}} [options]; amer experiment NAME --help")
        return 0 if argv else 2
    if argv[0] not in EXPERIMENTS:
        return _fail(f"unknown experiment '{argv[0]}' (experiments: {', '.join(EXPERIMENTS)})")
    import importlib

    return importlib.import_module(f"amer.experiments.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
