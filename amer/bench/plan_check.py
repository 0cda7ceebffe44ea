"""``amer bench plan``: the planner's predictions (:mod:`amer.training.planner`) beside the peak memory measured
on CPU runs of the same layouts, and each rank's peak host memory while it builds its share of the model.

Every layout runs in its own processes (``torchrun`` for more than one rank) and trains a few steps of a
model of some hundred MB with synthetic batches, on the same per-rank construction and training step that
``amer train`` runs. Measured per rank:

* ``peak tensor bytes``: the high-water mark of live tensor bytes from before the model is built to the end of
  the last step, from the CPU allocator's events (:func:`amer.bench.harness.peak_tensor_bytes`): what a GPU
  allocator's ``max_memory_allocated`` reports, and what the planner predicts;
* ``construction RSS`` (the ``construction`` suite, without the profiler): the peak resident memory of the
  process while it builds and initialises its share (``VmHWM`` after ``/proc/self/clear_refs`` reset it), above
  what the process held before.

The model runs its rows straight through (``--packing none``) and without STP, as the planner counts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from amer.bench.harness import MB, BenchOptions, SuiteResult
from amer.bench.workloads import make_batch
from amer.config import ModelConfig, ParallelConfig, STPConfig, TrainConfig, from_dict, to_dict
from amer.fileio import write_json
from amer.fileread import json_loads, read_file
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import distributed as D
from amer.training import scaleout
from amer.training.checkpointing import apply_activation_checkpointing
from amer.training.optim import make_optimizer
from amer.training.planner import PlanLayout, plan
from amer.training.step import TrainStep

__all__ = ["suite_plan", "suite_construction", "LAYOUTS", "measure_layout", "probe_model"]

# (name, ranks, --parallel settings, train settings)
LAYOUTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("one process", {}, {}),
    ("one process, checkpointing blocks", {}, {"activation_checkpointing": "blocks"}),
    ("dp 2 (FSDP2)", {"dp": 2}, {}),
    ("dp 2 (DDP)", {"dp": 2, "data": "ddp"}, {}),
    ("dp 2 x ep 2", {"dp": 2, "ep": 2}, {}),
    ("pp 2, 1F1B, 2 microbatches", {"pp": 2}, {}),
    ("pp 2, GPipe, 4 microbatches", {"pp": 2, "schedule": "gpipe", "microbatches": 4}, {}),
    ("dp 2 x pp 2 (FSDP2)", {"dp": 2, "pp": 2}, {}),
]


def probe_model(quick: bool = False) -> ModelConfig:
    """A model of about 30M parameters (4M with ``quick``) whose activations, at batch 8 x 256, are of the size
    of its weights and optimizer state: both halves of the account matter."""
    d = 128 if quick else 384
    return ModelConfig(pattern="AEMR|AEMR", d_model=d, vocab_size=512, max_seq_len=512,
                       attention={"n_heads": 4, "n_kv_heads": 2}, mamba={"d_state": 16, "head_dim": 32},
                       moe={"n_experts": 4, "top_k": 2, "d_ff": 2 * d}, recurrent={"n_heads": 4})


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``): Linux resets it when ``5`` is written to ``clear_refs``."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one layout (under torchrun, or alone): build, train ``steps`` steps, measure."""
    from torch.profiler import ProfilerActivity, profile


    torch.set_num_threads(1)
    cfg = from_dict(TrainConfig, spec["train"])
    layout = D.setup(cfg.parallel, torch.device("cpu"))
    policy = STPPolicy(cfg.stp, cfg.model.parsed)
    batches = [make_batch(cfg.model.vocab_size, cfg.batch_size, cfg.seq_len, seed=i) for i in range(spec["steps"])]
    batches = [{k: v for k, v in b.items() if k != "doc_ids"} for b in batches]  # rows straight through
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if layout.distributed:
            step = scaleout.build(cfg, layout, HybridLM.empty(cfg.model), policy, torch.Generator()).step_fn
        else:
            model = HybridLM(cfg.model, seed=cfg.seed)
            apply_activation_checkpointing(model, cfg.activation_checkpointing)
            step = TrainStep(model, make_optimizer(model, cfg), policy, documents=False)
        for i, b in enumerate(batches):
            step([b], i)
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    out = {"rank": layout.rank, "peak_tensor_bytes": peak}
    D.teardown(layout)
    return out


def construction_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank building its share of the model (no training): the peak RSS above what the process held."""

    torch.set_num_threads(1)
    cfg = from_dict(TrainConfig, spec["train"])
    layout = D.setup(cfg.parallel, torch.device("cpu"))
    policy = STPPolicy(cfg.stp, cfg.model.parsed)
    warm = replace(cfg, model=replace(cfg.model, d_model=32, moe={**to_dict(cfg.model.moe), "d_ff": 64}))
    _build(warm, layout, policy)  # the code every build runs is paged in before the baseline is read
    if layout.distributed:
        torch.distributed.barrier()
    ok = _reset_peak_rss()
    before = _rss_kib("VmRSS")
    held = _build(cfg, layout, policy)
    peak = (_rss_kib("VmHWM") - before) * 1024 if ok else None
    n = sum(D.local_tensor(p).numel() * p.element_size() for p in held.parameters())
    out = {"rank": layout.rank, "construction_rss_bytes": peak, "held_bytes": n}
    D.teardown(layout)
    return out


def _build(cfg: TrainConfig, layout: Any, policy: Any) -> torch.nn.Module:

    if not layout.distributed:
        return HybridLM(cfg.model, seed=cfg.seed)
    return D.unwrap(scaleout.build(cfg, layout, HybridLM.empty(cfg.model), policy, torch.Generator()).module)


def _launch(fn: str, cfg: TrainConfig, extra: dict[str, Any], timeout: int) -> list[dict[str, Any]]:
    """Run ``fn`` of this module on every rank of ``cfg``'s layout in fresh processes; each rank writes its result
    as ``rank<r>.json`` (its stdout would interleave with the other ranks')."""
    with tempfile.TemporaryDirectory() as out:
        spec = json.dumps({"train": to_dict(cfg), **extra})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        code = ["-c", f"import sys; from amer.fileread import json_loads; from amer.bench.plan_check import {fn}, "
                      f"_report; _report(sys.argv[2], {fn}(json_loads(sys.argv[1])))", spec, out]
        world = cfg.parallel.world
        cmd = [sys.executable, *code] if world == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
             "--no-python", sys.executable, *code]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{fn} {to_dict(cfg.parallel)} failed:\n{proc.stderr[-3000:]}")
        return [json_loads(read_file(p)) for p in sorted(Path(out).glob("rank*.json"))]


def _report(folder: str, result: dict[str, Any]) -> None:
    write_json(Path(folder) / f"rank{result['rank']}.json", result)


def measure_construction(model: ModelConfig, parallel: dict[str, Any], timeout: int = 900) -> list[dict[str, Any]]:
    """Every rank's peak RSS while it builds its share of ``model`` under ``parallel``."""
    cfg = TrainConfig(model=model, batch_size=2 * ParallelConfig(**parallel).dp, seq_len=64,
                      parallel=ParallelConfig(**parallel), stp=STPConfig(enabled=False))
    return _launch("construction_worker", cfg, {}, timeout)


def suite_construction(opts: BenchOptions) -> SuiteResult:
    """Peak host memory per rank while it builds its share of a model of a few hundred MB."""
    res = SuiteResult("construction")
    model = probe_model(opts.quick)
    if not opts.quick:
        model = replace(model, d_model=1024, moe={**to_dict(model.moe), "d_ff": 2048})
    total = sum(p.numel() * 4 for p in _params(model))
    for name, parallel in (("one process", {}), ("pp 2", {"pp": 2}), ("dp 2 (FSDP2)", {"dp": 2}),
                           ("dp 2 x ep 2", {"dp": 2, "ep": 2})):
        for r in sorted(measure_construction(model, parallel), key=lambda r: r["rank"]):
            res.rows.append({"layout": name, "rank": r["rank"], "holds_MB": r["held_bytes"] / MB,
                             "peak_rss_MB": (r["construction_rss_bytes"] or float("nan")) / MB,
                             "peak_over_model": (r["construction_rss_bytes"] or float("nan")) / total})
    res.notes.append(f"model {model.pattern} at width {model.d_model}: {total / MB:.0f} MB of fp32 weights; the "
                     "largest initialisation unit (an expert block) is what a sharded rank holds whole for a moment")
    return res


def measure_layout(model: ModelConfig, parallel: dict[str, Any], train: dict[str, Any], *, batch: int, seq_len: int,
                   steps: int = 3, timeout: int = 900) -> list[dict[str, Any]]:
    """Run one layout in fresh processes and return every rank's measurements."""
    cfg = TrainConfig(model=model, batch_size=batch, seq_len=seq_len, packing="none",
                      parallel=ParallelConfig(**parallel), stp=STPConfig(enabled=False), **train)
    return _launch("worker", cfg, {"steps": steps}, timeout)


def suite_plan(opts: BenchOptions) -> SuiteResult:
    """Predicted against measured peak tensor memory per layout (worst rank), and construction RSS."""

    res = SuiteResult("plan")
    model = probe_model(opts.quick)
    batch, seq_len = (4, 64) if opts.quick else (8, 256)
    layouts = LAYOUTS[:3] if opts.quick else LAYOUTS
    for name, parallel, train in layouts:
        par = ParallelConfig(**parallel)
        ranks = measure_layout(model, parallel, train, batch=batch, seq_len=seq_len)
        lay = PlanLayout(dp=par.dp, pp=par.pp, ep=par.ep, microbatches=par.microbatches, schedule=par.schedule,
                         batch=batch, seq_len=seq_len, checkpointing=train.get("activation_checkpointing", "none"),
                         data=par.data)
        p = plan(model, lay, float("inf"))
        measured = max(r["peak_tensor_bytes"] for r in ranks)
        res.rows.append({"layout": name, "ranks": len(ranks), "predicted_MB": p.peak / MB, "measured_MB": measured / MB,
                         "error": p.peak / measured - 1.0})
    n = sum(p.numel() for p in _params(model))
    res.notes.append(f"model {model.pattern} at width {model.d_model}, {n / 1e6:.1f}M parameters "
                     f"({4 * n / MB:.0f} MB fp32), batch {batch} x {seq_len}, fp32, 3 steps; peak = max over ranks; "
                     "error = predicted / measured - 1")
    return res


def _params(cfg: ModelConfig) -> list[torch.Tensor]:

    return list(HybridLM.empty(cfg).parameters())
