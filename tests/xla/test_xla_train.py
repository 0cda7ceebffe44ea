"""Training on XLA (PJRT CPU): graph counts read from torch_xla's compile counter, parity with eager CPU,
checkpoints that load on CPU, and negative controls showing the counter catches a recompiling step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import amer
from amer import xla
from amer.blocks.moe import MoEMixer
from amer.checkpoint import load_checkpoint
from amer.config import ModelConfig, STPConfig, TrainConfig
from amer.objective import total_loss
from amer.pattern import load_preset
from amer.stp import STPPolicy
from amer.training.optim import lr_at, make_optimizer
from amer.training.step import TrainStep

DEV = xla.xla_device()
COUNTS: list[int] = []  # the compile counter after each step of run_steps


def tiny(**moe) -> ModelConfig:
    cfg = ModelConfig.from_preset("tiny")
    return replace(cfg, moe=replace(cfg.moe, **moe)) if moe else cfg


def stp_cfg(**kw) -> STPConfig:
    return STPConfig(**{**load_preset("tiny")["stp"], **kw})


def batches(n: int, seed: int = 2, b: int = 4, t: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 256, (b, t + 1), generator=g)
        docs = (torch.rand(b, t, generator=g) < 0.05).long().cumsum(1)  # a few packed documents per row
        out.append({"tokens": tok[:, :-1], "targets": tok[:, 1:], "doc_ids": docs})
    return out


def run_steps(model: torch.nn.Module, stp: STPConfig, data: list, *, log_every: int = 5) -> list[list[float]]:
    """Train on ``data`` with TrainStep; returns [total, ce, aux, stp] per step (read at the end)."""
    tcfg = TrainConfig(lr=3e-3, warmup_steps=2)
    opt = make_optimizer(model, tcfg)
    step_fn = TrainStep(model, opt, STPPolicy(stp, model.pattern), stp_generator=torch.Generator().manual_seed(1))
    parts = []
    for step, b in enumerate(data):
        res = step_fn([b], step, lr=lr_at(step, tcfg), metrics=(step + 1) % log_every == 0)
        assert res.applied
        COUNTS.append(xla.compile_count())
        parts.append(torch.stack([res.loss.total, res.loss.ce, res.loss.aux, res.loss.stp]).detach())
    return [p.cpu().tolist() for p in parts]


def xla_model(cfg: ModelConfig, seed: int = 0) -> amer.HybridLM:
    torch.manual_seed(seed)
    return xla.move(amer.HybridLM(cfg), DEV)


def graphs_for(fn) -> int:
    before = xla.compile_count()
    fn()
    return xla.compile_count() - before


# ------------------------------------------------------------------------------------------ graph counts


def test_training_run_compiles_three_graphs(tmp_path) -> None:
    """30 tiny steps, STP gated on at step 10 (ramp 5), evaluation + checkpoint at 20 and 30: train micro-step,
    optimizer, evaluation; nothing else. The XLA checkpoint loads on CPU with the device's weights."""
    from amer.training.loop import train

    cfg = TrainConfig(model=tiny(), stp=stp_cfg(start_step=10, ramp_steps=5), steps=30, batch_size=4, seq_len=64,
                      eval_interval=20, log_interval=5, eval_batches=2, device="xla", out_dir=str(tmp_path),
                      progress=False, curves=False, tensorboard=False)
    summary: dict = {}
    n = graphs_for(lambda: summary.update(train(cfg, quiet=True)))
    assert n == 3, n
    model, _ = load_checkpoint(summary["checkpoint"])[:2]
    assert next(model.parameters()).device.type == "cpu"
    assert model.lm_head.weight is model.embed.weight  # tied on the device too, and saved tied
    on_xla, _ = load_checkpoint(summary["checkpoint"], device=DEV)[:2]
    assert on_xla.lm_head.weight is on_xla.embed.weight  # loading onto XLA keeps the tie (no stale head)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    for mod in model.modules():  # XLA runs the capacity dispatch (a document's first token keeps no slot)
        if isinstance(mod, MoEMixer):
            mod.dispatch = "capacity"
    with torch.no_grad():
        torch.testing.assert_close(on_xla(ids.to(DEV), taps=False).logits.cpu(), model(ids, taps=False).logits,
                                   rtol=1e-5, atol=1e-5)


def warm_then_steady(model: torch.nn.Module, stp: STPConfig, n: int) -> tuple[int, int]:
    """(graphs compiled by the first two steps, graphs compiled after them); the gate opens after warm-up."""
    COUNTS.clear()
    start = xla.compile_count()
    run_steps(model, stp, batches(n))
    return COUNTS[1] - start, COUNTS[-1] - COUNTS[1]


@pytest.mark.parametrize("n_spans", [1, 16])
def test_graph_count_does_not_depend_on_n_spans(n_spans: int) -> None:
    warm, later = warm_then_steady(xla_model(tiny()), stp_cfg(start_step=3, ramp_steps=3, n_spans=n_spans), 9)
    assert warm <= 3 and later == 0, (warm, later)  # micro-step + optimizer; the gate opening and ramp add none


@pytest.mark.parametrize("family", ["A", "E", "M", "R"])
def test_graph_count_per_family(family: str) -> None:
    stp = stp_cfg(start_step=3, ramp_steps=2, layers=f"{family}-1")
    warm, later = warm_then_steady(xla_model(replace(tiny(), pattern=family)), stp, 7)
    assert warm <= 3 and later == 0, (family, warm, later)


# ------------------------------------------------------------------------------------ negative controls


class _Dynamic(torch.nn.Module):
    """A test-only model with a data-dependent shape (boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[x > 0] * self.w.sum()).sum()


def test_counter_catches_a_data_dependent_shape() -> None:
    m = _Dynamic().to(DEV)
    g = torch.Generator().manual_seed(0)

    def steps() -> None:
        for _ in range(6):
            m(torch.randn(64, generator=g).to(DEV)).backward()
            xla.sync(DEV)

    assert graphs_for(steps) > 2


def test_counter_catches_a_python_float_gate() -> None:
    """The STP gate as a Python float (the eager path: no STP term while closed) compiles a new graph when
    it opens and again for each ramp value, where the tensor gate above compiled none."""
    model = xla_model(tiny())
    policy = STPPolicy(stp_cfg(start_step=2, ramp_steps=3), model.pattern)
    gen = torch.Generator().manual_seed(1)

    def steps() -> None:
        for step, b in enumerate(batches(6)):
            b = {k: v.to(DEV) for k, v in b.items()}
            out = model(b["tokens"], doc_ids=b["doc_ids"])
            total_loss(policy, out, b["targets"], step, doc_ids=b["doc_ids"], generator=gen).total.backward()
            xla.sync(DEV)

    assert graphs_for(steps) > 2


# --------------------------------------------------------------------------------------------- parity


def test_losses_match_eager_cpu() -> None:
    """20 steps from the same initialisation and batches (capacity dispatch on both): every loss part, STP
    and MoE aux included, within 1e-4 relative."""
    cfg = tiny(dispatch="capacity")
    stp = stp_cfg(start_step=5, ramp_steps=5)
    data = batches(20)
    torch.manual_seed(0)
    cpu = run_steps(amer.HybridLM(cfg), stp, data)
    dev = run_steps(xla_model(cfg, seed=0), stp, data)
    for step, (a, b) in enumerate(zip(cpu, dev)):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6, msg=f"step {step}")
    assert dev[-1][3] > 0 and dev[-1][2] > 0  # STP and the MoE aux are live


def test_bench_suite_reports_compiles_and_step_time() -> None:
    from amer.bench import BenchOptions, run_suite

    res = run_suite("xla", BenchOptions(quick=True, repeats=2, warmup=2))
    rows = {r["name"]: r for r in res.rows}
    assert set(rows) == {"eager cpu", "xla"}
    assert 1 <= rows["xla"]["graphs_warmup"] <= 3 and rows["xla"]["graphs_after"] == 0
    assert rows["xla"]["ms"] > 0 and rows["xla"]["first_step_s"] > 0
