"""The ``gpu`` suite: the full training step on one CUDA device, kernels vs references.

For the ``small`` preset and the ~350M ``m350`` preset, the step ``amer train`` runs (forward, backward, clip,
AdamW; bf16 autocast; packed documents kept apart; STP on the last block of each family) is timed twice in
the same process, interleaved round by round: with the fast paths :mod:`amer.ops.kernels` picks
(``AMER_KERNELS=auto``: mamba-ssm's SSD kernels, causal-conv1d, grouped GEMM experts, flash / flex attention)
and with every op on its pure-torch reference (``kernels.use("reference")``). Reported per preset and mode:
tokens/s, step time, peak memory, MFU and the backend each op ran.

MFU is the model's matmul FLOPs per step (:func:`amer.bench.flops.training_flops`: useful GEMM work only, the
scans' decay algebra and elementwise ops left out) divided by the step time and by the device's dense bf16 peak:
the data-sheet figure where the device is known (H100 / H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312), and
always next to it the rate of a large bf16 GEMM measured in the same run (what the device delivers).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from amer.bench.flops import training_flops
from amer.bench.harness import BenchOptions, SuiteResult, interleave, median, paired_ratio
from amer.bench.workloads import OPTIMIZER_SETTINGS, build_model, make_batch, train_step, with_stp
from amer.config import ModelConfig
from amer.ops import kernels
from amer.training.optim import make_optimizer

__all__ = ["suite_gpu", "PEAK_BF16", "peak_bf16", "GPU_PRESETS"]

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12}
# preset -> (batch, seq_len) for --quick and for the full run
GPU_PRESETS = {"small": ((8, 1024), (16, 1024)), "m350": ((4, 2048), (8, 2048))}


def peak_bf16(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a device name, or None when it is not in :data:`PEAK_BF16`."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16[key]
    return None


def _gemm_rate(device: torch.device, n: int = 8192, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / median(times)


def _step(cfg: ModelConfig, batch: dict[str, torch.Tensor], mode: str, seed: int, compile: bool) -> Any:
    with kernels.use(mode):
        model = build_model(cfg, seed, compile).cuda()
        fn = train_step(model, batch, with_stp(model, 4), make_optimizer(model, OPTIMIZER_SETTINGS), dtype="bfloat16")

    def run() -> None:
        with kernels.use(mode):
            fn()
        torch.cuda.synchronize()

    return model, run


def suite_gpu(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("gpu")
    if not torch.cuda.is_available():
        res.notes.append("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return res
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16(name)
    gemm = _gemm_rate(device)
    res.notes.append(f"{name}: bf16 GEMM 8192^3 measured {gemm / 1e12:.1f} TFLOP/s; data-sheet dense bf16 peak "
                     + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown (MFU against the measured GEMM only)"))
    available = kernels.available()
    res.notes.append("kernel packages: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in available.items()))
    for preset, shapes in GPU_PRESETS.items():
        B, T = shapes[0] if opts.quick else shapes[1]
        cfg = ModelConfig.from_preset(preset)
        batch = make_batch(cfg.vocab_size, B, T, opts.seed)
        flops = training_flops(cfg, B, T)["total"]
        fns, backends, memory = {}, {}, {}
        for mode in ("auto", "reference"):
            torch.cuda.reset_peak_memory_stats(device)
            model, fn = _step(cfg, batch, mode, opts.seed, opts.compile)
            fn()  # first step: Triton compiles and autotunes here, outside the timed rounds
            memory[mode] = torch.cuda.max_memory_allocated(device) / 2**30
            backends[mode] = kernels.choices()
            fns[mode] = fn
        times = interleave(fns, opts.repeats, opts.warmup)
        for mode in fns:
            t = median(times[mode])
            res.rows.append({"name": f"{preset} {'kernels' if mode == 'auto' else 'reference'}",
                             "batch": f"{B}x{T}", "tokens_per_s": B * T / t, "ms": t * 1e3,
                             "speedup": paired_ratio(times["reference"], times[mode]),
                             "MFU": flops / t / peak if peak else "", "MFU_of_gemm": flops / t / gemm,
                             "peak_GiB": memory[mode]})
        res.notes.append(f"{preset} ({B}x{T}, {flops / 1e12:.2f} TFLOP per step) kernels: "
                         + "; ".join(f"{op} {how}" for op, how in sorted(backends["auto"].items())))
        del fns, model
        torch.cuda.empty_cache()
    res.notes.append("full step (forward + backward + clip + AdamW), bf16 autocast, packed documents, STP on the last "
                     "block of each family; speedup = median of per-round (reference / this); MFU = model matmul "
                     "FLOPs / step time / data-sheet bf16 peak; MFU_of_gemm: the same over the measured GEMM rate")
    return res
