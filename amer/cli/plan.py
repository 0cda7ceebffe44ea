"""``amer plan``: per-rank memory and FLOPs of a training layout, whether it fits a device, and the smallest
layout that does (see :mod:`amer.training.planner`)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from amer.cli.base import ArgParser
from amer.config import ModelConfig
from amer.errors import ConfigError
from amer.report import text_table
from amer.training.planner import GiB, Plan, PlanLayout, plan, suggest

__all__ = ["command"]


def build_parser() -> ArgParser:
    p = ArgParser(prog="amer plan", description="Predict what a training layout needs per rank (parameters, "
                  "gradients, AdamW state, activations with the schedule's in-flight microbatches, transient "
                  "buffers), its FLOPs per step, whether it fits a device, and the smallest layout that fits.")
    p.add_argument("--preset", default="small", help="model preset (default small; nam56r is the large one)")
    p.add_argument("--pattern", help="a pattern instead of the preset's (the preset's dimensions are kept)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks (as --parallel.dp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (the pattern is cut into this many "
                   "stages of consecutive layers unless it already has them)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (as --parallel.ep)")
    p.add_argument("--microbatches", type=int, help="pipeline microbatches (default: one per stage)")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b", help="pipeline schedule")
    p.add_argument("--data", choices=("fsdp", "ddp"), default="fsdp", help="data-parallel engine")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, global (as in amer train)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--activation-checkpointing", choices=("none", "blocks", "selective"), default="none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="compute dtype (bfloat16 autocast, the GPU default here; weights and AdamW stay fp32)")
    p.add_argument("--device-memory", type=float, default=80.0, help="memory of one device in GiB (default 80)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the device kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    p.add_argument("--max-gpus", type=int, default=4096, help="largest layout the suggestion may use")
    p.add_argument("--gpus", type=int, help="suggest a layout of exactly this many devices (default: the fewest)")
    p.add_argument("--json", action="store_true", help="print the plan (and the suggestion) as JSON")
    return p


def _model(args: object) -> ModelConfig:
    cfg = ModelConfig.from_preset(args.preset)  # type: ignore[attr-defined]
    if args.pattern:  # type: ignore[attr-defined]
        cfg = replace(cfg, pattern=args.pattern)  # type: ignore[attr-defined]
    return cfg


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:,.0f} FLOP"


def render(p: Plan) -> str:
    """The plan as text: one row per stage (bytes per rank), then the totals."""
    headers = ["stage", "layers", "params", "grads", "AdamW", "activations", "in flight", "transient", "peak"]
    rows = [[str(s.stage), s.layers if len(s.layers) <= 24 else f"{s.layers[:21]}...", *(
        f"{v / GiB:.2f}" for v in (s.params, s.grads, s.optimizer, s.activations)), str(s.in_flight),
        f"{s.transient / GiB:.2f}", f"{s.peak / GiB:.2f}"] for s in p.stages]
    lay = p.layout
    usable = p.device_bytes * (1 - p.headroom)
    lines = [f"layout: {lay.describe()} ({lay.world} ranks); GiB per rank",
             text_table(headers, rows), "",
             f"parameters: {p.n_params / 1e9:.2f}B; tokens per step {p.tokens_per_step:,}; "
             f"{_flops(p.flops_per_step)} per step ({_flops(p.flops_per_step / lay.world)} per rank)",
             f"peak per rank {p.peak / GiB:.2f} GiB of {usable / GiB:.1f} usable "
             f"({p.device_bytes / GiB:g} GiB, {p.headroom:.0%} headroom): "
             + ("fits" if p.fits else "does NOT fit")]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _as_dict(p: Plan) -> dict[str, object]:
    return {"layout": p.layout.__dict__, "pattern": p.pattern, "stages": [s.row() for s in p.stages],
            "n_params": p.n_params, "flops_per_step": p.flops_per_step, "tokens_per_step": p.tokens_per_step,
            "peak_GiB": p.peak / GiB, "device_GiB": p.device_bytes / GiB, "headroom": p.headroom, "fits": p.fits}


def command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("dp", "pp", "ep", "batch_size", "seq_len", "max_gpus"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.microbatches is not None and args.microbatches < 1:
        raise ConfigError(f"--microbatches must be >= 1, got {args.microbatches}")
    if not (args.device_memory > 0 and math.isfinite(args.device_memory)):
        raise ConfigError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
    if not 0 <= args.headroom < 1:
        raise ConfigError(f"--headroom must be in [0, 1), got {args.headroom}")
    cfg = _model(args)
    lay = PlanLayout(dp=args.dp, pp=args.pp, ep=args.ep, microbatches=args.microbatches, schedule=args.schedule,
                     batch=args.batch_size, seq_len=args.seq_len, checkpointing=args.activation_checkpointing,
                     dtype=args.dtype, data=args.data)
    device = args.device_memory * GiB
    p = plan(cfg, lay, device, headroom=args.headroom)
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    best = None if p.fits else suggest(cfg, lay, device, max_world=args.max_gpus, headroom=args.headroom,
                                       world=args.gpus)
    if args.json:
        print(json.dumps({"plan": _as_dict(p), "suggestion": _as_dict(best) if best else None}, indent=2))
        return 0
    print(render(p))
    if not p.fits:
        print()
        if best is None:
            where = f"of {args.gpus}" if args.gpus else f"of up to {args.max_gpus}"
            print(f"no layout {where} devices fits {args.batch_size} x {args.seq_len} per step; "
                  "lower --batch-size or --seq-len")
        else:
            print(f"smallest layout that fits: {best.layout.describe()} ({best.layout.world} devices, peak "
                  f"{best.peak / GiB:.1f} GiB)")
            print(render(best))
    return 0
