"""Where a step's time goes, by operator: the GEMMs' own speed and share, and the largest other ops.

A step's fraction of the fp32 matmul rate is bounded by how fast its own GEMMs run at their own shapes:
a narrow model's (tokens, 192) x (192, 384) products and the scans' (64, 64) batched products do not
reach the rate of a 2048^3 product even with every other op gone. :func:`op_profile` runs a step under
``torch.profiler`` with FLOP counting and splits its time into the GEMM operators (their FLOPs and
self time) and everything else, so a benchmark can print that ceiling next to the measured fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["GEMM_OPS", "OpProfile", "op_profile"]

# operators that are matrix products; the profiler counts FLOPs for these (and for some elementwise ops,
# whose "FLOPs" are not matmul work and are left out)
GEMM_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::addbmm",
                      "aten::_grouped_mm"})


@dataclass
class OpProfile:
    """Per-call averages over the profiled calls."""

    total_s: float  # profiled time (the events' self times summed), per call
    gemm_s: float  # self time of the GEMM operators, per call
    gemm_flops: float  # FLOPs of the GEMM operators, per call
    top: list[tuple[str, float]] = field(default_factory=list)  # (operator, self seconds per call), non-GEMM

    @property
    def gemm_share(self) -> float:
        return self.gemm_s / self.total_s if self.total_s else 0.0

    @property
    def gemm_rate(self) -> float:
        """FLOP/s of the GEMM operators alone: the most the step could reach with every other op free."""
        return self.gemm_flops / self.gemm_s if self.gemm_s else 0.0

    def describe(self, n: int = 5) -> str:
        others = ", ".join(f"{name.removeprefix('aten::')} {s / self.total_s:.0%}" for name, s in self.top[:n])
        return f"GEMMs {self.gemm_share:.0%} of op time at {self.gemm_rate / 1e9:.0f} GFLOP/s; then {others}"


def op_profile(fn: Callable[[], None], calls: int = 3, top: int = 8) -> OpProfile:
    """Profile ``calls`` runs of ``fn`` (already warmed up) and split the operators' self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(calls):
            fn()
    total = gemm = flops = 0.0
    others: dict[str, float] = {}
    for ev in prof.key_averages():
        s = ev.self_cpu_time_total / 1e6
        total += s  # self times partition the profiled time among the events
        if ev.key in GEMM_OPS:
            gemm += s
            flops += ev.flops or 0.0
        elif ev.key.startswith("aten::"):
            others[ev.key] = others.get(ev.key, 0.0) + s
    ranked = sorted(others.items(), key=lambda kv: -kv[1])[:top]
    return OpProfile(total / calls, gemm / calls, flops / calls, [(k, v / calls) for k, v in ranked])
