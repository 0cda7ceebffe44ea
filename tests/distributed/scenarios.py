"""Multi-process checks, run under ``torchrun --nproc-per-node 2`` by ``tests/test_distributed.py``.

``python -m torch.distributed.run --nproc-per-node 2 tests/distributed/scenarios.py NAME`` runs one
scenario on two CPU processes (gloo). Each prints ``ok <what>`` lines on rank 0 and exits non-zero with
the reason when a check fails, so the pytest side only has to read the exit code and the output.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.distributed as dist

from amer import HybridLM, ModelConfig
from amer.config import ParallelConfig, STPConfig, TrainConfig
from amer.objective import total_loss
from amer.stp import STPPolicy
from amer.training import distributed as D
from amer.training import pipeline as P
from amer.training.optim import make_optimizer
from amer.training.pipeline_step import PipelineStep
from amer.training.step import TrainStep

SEED = 3
VOCAB = 64


def model_config(pattern: str, vocab: int = VOCAB, **moe: object) -> ModelConfig:
    return ModelConfig(pattern=pattern, d_model=32, vocab_size=vocab, max_seq_len=64, init_std=0.1,
                       attention={"n_heads": 4, "n_kv_heads": 2},
                       mamba={"d_state": 8, "head_dim": 16, "chunk_size": 8},
                       moe={"n_experts": 4, "top_k": 2, "d_ff": 48, **moe}, recurrent={"n_heads": 2})


def batch(rows: int, T: int = 24, seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Packed rows: documents start at random (and at every row's first token)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (rows, T + 1), generator=g)
    starts = torch.rand(rows, T, generator=g) < 0.1
    starts[:, 0] = True
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "doc_ids": starts.long().cumsum(1)}


def stp(layers: str, start: int = 0) -> STPConfig:
    return STPConfig(enabled=True, layers=layers, weight=0.5, start_step=start, ramp_steps=0, n_spans=3)


def fail(msg: str) -> None:
    print(f"FAIL rank {dist.get_rank()}: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def say(layout: D.Layout, msg: str) -> None:
    if layout.main:
        print(f"ok {msg}", flush=True)


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    if not err <= tol:
        fail(f"{what}: max relative difference {err:.3g} > {tol}")


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (collective): what the shards add up to."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(D.unwrap(module), options=StateDictOptions(full_state_dict=True))
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}


def reference_grads(model: HybridLM, policy: STPPolicy, data: dict[str, torch.Tensor], m: int, step: int) -> dict:
    """What one process computes: the batch as m accumulated micro-batches, the step's objective."""
    gen = torch.Generator().manual_seed(SEED)
    model.zero_grad(set_to_none=True)
    for i in range(m):
        mb = {k: v.tensor_split(m)[i] for k, v in data.items()}
        out = model(mb["tokens"], doc_ids=mb["doc_ids"])
        parts = total_loss(policy, out, mb["targets"], step, doc_ids=mb["doc_ids"], generator=gen)
        (parts.total / m).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def stage_grads_equal(stage: P.StageModule, ref: dict, layout: D.Layout, what: str) -> None:
    """Every parameter of this rank's stage has one process's gradient (a tied head's is the embedding's)."""
    for name, p in stage.named_parameters():
        if p.grad is None:
            fail(f"{what}: {name} got no gradient")
        close(p.grad, ref["embed.weight" if name == "lm_head.weight" and stage.tied_copy else name],
              f"{what} stage {layout.pp_rank} {name}")


def pp_grads(layout: D.Layout) -> None:
    """pp=2: every parameter's gradient equals one process's, for both schedules and 1, 2, 4 microbatches;
    with the seam disabled, stage 0's do not (the auxiliary gradient never arrives)."""
    cfg = model_config("AEM|ER")
    torch.manual_seed(0)
    base = HybridLM(cfg)
    policy = STPPolicy(stp("A-1,M-1,E-1,R-1,final"), base.pattern)
    data = batch(4)
    span = STPPolicy(dataclasses.replace(policy.cfg, form="span"), base.pattern)  # the span form, same contract
    triple = policy
    for schedule, m, policy in (("gpipe", 1, triple), ("gpipe", 2, triple), ("gpipe", 4, triple), ("1f1b", 2, triple),
                                ("1f1b", 4, triple), ("1f1b", 2, span)):  # 1f1b needs m >= 2
        ref = reference_grads(copy.deepcopy(base), policy, data, m, step=5)
        model = copy.deepcopy(base)
        stage = P.StageModule(model, layout.pp_rank, 2, policy, stp_generator=torch.Generator().manual_seed(SEED))
        runner = PipelineStep(stage, stage, None, layout, microbatches=m, schedule=schedule, grad_clip=None,
                              keep_gradients=True, rows=4, seq_len=24)
        out = runner([data], 5)
        if not out.applied:
            fail(f"{schedule} m={m}: step skipped ({out.skipped_reason})")
        stage_grads_equal(stage, ref, layout, f"{schedule} m={m}")
        dist.barrier()
        say(layout, f"pp=2 {schedule} microbatches={m} stp {policy.cfg.form}: gradients of both stages equal one "
                    "process's")
    policy = STPPolicy(stp("A-1,M-1,E-1,R-1,final"), base.pattern)
    P._SEAM_ENABLED = False
    try:
        model = copy.deepcopy(base)
        stage = P.StageModule(model, layout.pp_rank, 2, policy, stp_generator=torch.Generator().manual_seed(SEED))
        runner = PipelineStep(stage, stage, None, layout, microbatches=2, grad_clip=None, keep_gradients=True,
                              rows=4, seq_len=24)
        runner([data], 5)
        ref = reference_grads(copy.deepcopy(base), policy, data, 2, step=5)
        worst = max((((p.grad - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1.0)).item()
                     for n, p in stage.named_parameters() if n.startswith("blocks.0.")), default=1.0)
        flag = torch.tensor([worst])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item() > 1e-3:
            fail(f"seam disabled: stage-0 gradients still match one process (worst difference {flag.item():.3g})")
        say(layout, f"seam disabled: stage-0 gradients differ from one process's (by {flag.item():.3g})")
    finally:
        P._SEAM_ENABLED = True


def one_process_run(pattern: str, stp_layers: str, n_steps: int) -> tuple[
        HybridLM, TrainConfig, STPPolicy, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """What a data-parallel run must reproduce: the initial model, its settings and batches of 4 rows, and the
    parameters one process reaches after ``n_steps`` on the whole batches."""
    cfg = model_config(pattern)
    tcfg = TrainConfig(lr=3e-3, weight_decay=0.1, seq_len=24, model=cfg)
    torch.manual_seed(0)
    base = HybridLM(cfg)
    policy = STPPolicy(stp(stp_layers), base.pattern)
    steps = [batch(4, seed=s) for s in range(n_steps)]
    ref_model = copy.deepcopy(base)
    ref = TrainStep(ref_model, make_optimizer(ref_model, tcfg), policy,
                    stp_generator=torch.Generator().manual_seed(SEED))
    for i, b in enumerate(steps):
        ref([b], i)
    return base, tcfg, policy, steps, dict(ref_model.named_parameters())


def dp_equal(layout: D.Layout) -> None:
    """dp=2 with b rows per rank equals one process with 2b rows: parameters after 5 steps (STP on taps of
    several families, MoE balancing on), for FSDP2 and DDP."""
    base, tcfg, policy, steps, want = one_process_run("AEMER", "A-1,M-1,E-1,R-1", 5)
    for kind in ("fsdp", "ddp"):
        model = D.wrap_data_parallel(copy.deepcopy(base), layout, kind)
        opt = make_optimizer(model, tcfg)
        run = TrainStep(model, opt, policy, stp_generator=torch.Generator().manual_seed(SEED),
                        shard=(layout.dp_rank, layout.dp), agree=lambda ok: ok)
        for i, b in enumerate(steps):
            out = run([b], i)
            if not out.applied:
                fail(f"{kind}: step {i} skipped ({out.skipped_reason})")
        weights = full_weights(model)
        if layout.main:
            for name, p in want.items():
                # AdamW's first steps turn float rounding in the summed gradients into ~1e-5 parameter differences;
                # the control below moves them by ~1e-2
                close(weights[name], p.detach(), f"dp=2 {kind}: {name} after 5 steps", tol=5e-5)
        dist.barrier()
        say(layout, f"dp=2 {kind}: parameters after 5 steps equal one process with the whole batch")
    # control: without the expert loads summed over the ranks, each rank balances its own half
    model = D.wrap_data_parallel(copy.deepcopy(base), layout, "ddp")
    for m in model.modules():
        if hasattr(m, "stats_group"):
            m.stats_group = None
    opt = make_optimizer(model, tcfg)
    run = TrainStep(model, opt, policy, stp_generator=torch.Generator().manual_seed(SEED),
                    shard=(layout.dp_rank, layout.dp))
    for i, b in enumerate(steps):
        run([b], i)
    got = dict(D.unwrap(model).named_parameters())
    worst = max(((got[n] - p).abs().max() / p.abs().max().clamp(min=1.0)).item() for n, p in want.items())
    if not worst > 5e-5:
        fail(f"control: per-rank MoE statistics still match one process (worst difference {worst:.3g})")
    say(layout, f"control: per-rank MoE statistics move the parameters off one process's (by {worst:.3g})")


def dp_bias(layout: D.Layout) -> None:
    """dp=2 with the auxiliary-loss-free expert bias: after 5 steps every rank holds the bias one process with the
    whole batch reaches (the loads it counts are the global ones), for FSDP2 and DDP; with per-rank loads the
    ranks drift apart."""
    cfg = model_config("AEAE", score="sigmoid", expert_bias=True, bias_update_rate=0.05)
    tcfg = TrainConfig(lr=3e-3, seq_len=24, model=cfg)
    torch.manual_seed(0)
    base = HybridLM(cfg)
    policy = STPPolicy(stp("A-1,E-1"), base.pattern)
    steps = [batch(4, seed=s) for s in range(5)]
    names = [n for n, _ in base.named_buffers() if n.endswith("expert_bias")]

    def biases(model: torch.nn.Module) -> torch.Tensor:
        own = dict(D.unwrap(model).named_buffers())
        return torch.stack([own[n] for n in names])

    def train(model: torch.nn.Module, shard: tuple[int, int] | None) -> torch.Tensor:
        run = TrainStep(model, make_optimizer(model, tcfg), policy, stp_generator=torch.Generator().manual_seed(SEED),
                        shard=shard)
        for i, b in enumerate(steps):
            run([b], i)
        return biases(model)

    want = train(copy.deepcopy(base), None)
    if not want.abs().sum() > 0:
        fail("the bias did not move in one process")
    for kind in ("fsdp", "ddp"):
        got = train(D.wrap_data_parallel(copy.deepcopy(base), layout, kind), (layout.dp_rank, layout.dp))
        close(got, want, f"dp=2 {kind}: expert bias after 5 steps", tol=0.0)
        say(layout, f"dp=2 {kind}: every rank's expert bias after 5 steps equals one process's")
    # control: each rank counting only its own rows moves its bias its own way
    model = D.wrap_data_parallel(copy.deepcopy(base), layout, "fsdp")
    for m in model.modules():
        if hasattr(m, "stats_group"):
            m.stats_group = None
    mine = train(model, (layout.dp_rank, layout.dp))
    ranks = [torch.zeros_like(mine) for _ in range(layout.dp)]
    dist.all_gather(ranks, mine, group=layout.dp_group)
    if torch.equal(ranks[0], ranks[1]):
        fail("control: per-rank loads still give every rank the same bias")
    say(layout, "control: per-rank loads give the ranks different biases")


def pp_parallel(layout: D.Layout) -> None:
    """pp=2 with a parallel layer on each stage: every gradient equals one process's, with STP on a branch tap, a
    parallel layer's own tap and the taps around the cut."""
    cfg = model_config("[AM]E|[AM]R")
    torch.manual_seed(0)
    base = HybridLM(cfg)
    policy = STPPolicy(stp("M0,L0,E0,A1,L-1,final"), base.pattern)
    data = batch(4)
    ref = reference_grads(copy.deepcopy(base), policy, data, 2, step=5)
    stage = P.StageModule(copy.deepcopy(base), layout.pp_rank, 2, policy,
                          stp_generator=torch.Generator().manual_seed(SEED))
    runner = PipelineStep(stage, stage, None, layout, microbatches=2, grad_clip=None, keep_gradients=True, rows=4,
                          seq_len=24)
    if not runner([data], 5).applied:
        fail("parallel layers: step skipped")
    stage_grads_equal(stage, ref, layout, "parallel layers")
    dist.barrier()
    say(layout, "pp=2 with a parallel layer on each stage: gradients equal one process's")


def pp_shared(layout: D.Layout) -> None:
    """pp=2 with one shared block used on both stages (and twice on the second, once in a parallel layer): its
    gradient on each stage is one process's, the sum over all its uses; without the tied-gradient group each
    stage's holds only its own uses' share (the negative control)."""
    cfg = model_config("A:z E M|A:z E [A:z M] R")
    torch.manual_seed(0)
    base = HybridLM(cfg)
    policy = STPPolicy(stp("A0,L1,M-1,final"), base.pattern)
    data = batch(4)
    ref = reference_grads(copy.deepcopy(base), policy, data, 2, step=5)

    def run(tied: bool) -> P.StageModule:
        stage = P.StageModule(copy.deepcopy(base), layout.pp_rank, 2, policy,
                              stp_generator=torch.Generator().manual_seed(SEED))
        runner = PipelineStep(stage, stage, None, layout, microbatches=2, grad_clip=1e9, keep_gradients=True,
                              rows=4, seq_len=24)
        if not tied:
            runner.share_groups = {}
        if not runner([data], 5).applied:
            fail("shared block: step skipped")
        return stage

    stage = run(tied=True)
    if sorted(stage.shared) != ["z"] or stage.shared_ties() != [("z", [0, 1])]:
        fail(f"shared block: stage {layout.pp_rank} holds {sorted(stage.shared)}, ties {stage.shared_ties()}")
    stage_grads_equal(stage, ref, layout, "shared block")
    dist.barrier()
    say(layout, "pp=2, a shared block on both stages: its gradient on each stage equals one process's")
    stage = run(tied=False)
    p = stage.shared["z"].mixer.qkv.weight
    flag = torch.tensor([((p.grad - ref["shared.z.mixer.qkv.weight"]).abs().max()
                          / ref["shared.z.mixer.qkv.weight"].abs().max()).item()])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item() > 1e-3:
        fail(f"tied-gradient group disabled: the shared block's gradient still matches ({flag.item():.3g})")
    say(layout, f"tied-gradient group disabled: each stage's shared gradient is a part (off by {flag.item():.3g})")


def dp_shared(layout: D.Layout) -> None:
    """dp=2 with a shared block used three times (once in a parallel layer): FSDP2 (the shared block one unit,
    gathered at each use) and DDP give one process's parameters after 3 steps."""
    base, tcfg, policy, steps, want = one_process_run("A:z E M A:z E [A:z M]", "A0,A1,L-1", 3)
    for kind in ("fsdp", "ddp"):
        model = D.wrap_data_parallel(copy.deepcopy(base), layout, kind)
        run = TrainStep(model, make_optimizer(model, tcfg), policy, stp_generator=torch.Generator().manual_seed(SEED),
                        shard=(layout.dp_rank, layout.dp), agree=lambda ok: ok)
        for i, b in enumerate(steps):
            if not run([b], i).applied:
                fail(f"{kind} shared block: step {i} skipped")
        weights = full_weights(model)
        if layout.main:
            if set(want) - set(weights) or not any(n.startswith("shared.z.") for n in weights):
                fail(f"{kind} shared block: parameters {sorted(set(want) - set(weights))} missing")
            for name, p in want.items():
                close(weights[name], p.detach(), f"dp=2 {kind} shared block: {name} after 3 steps", tol=5e-5)
        dist.barrier()
        say(layout, f"dp=2 {kind}, a shared block used three times: parameters after 3 steps equal one process's")


SCENARIOS = {"pp_grads": (ParallelConfig(pp=2), pp_grads), "pp_parallel": (ParallelConfig(pp=2), pp_parallel),
             "pp_shared": (ParallelConfig(pp=2), pp_shared), "dp_shared": (ParallelConfig(dp=2), dp_shared),
             "dp_equal": (ParallelConfig(dp=2), dp_equal), "dp_bias": (ParallelConfig(dp=2), dp_bias)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    parallel, fn = SCENARIOS[sys.argv[1]]
    layout = D.setup(parallel, torch.device("cpu"))
    try:
        fn(layout)
    except BaseException:
        D.teardown(layout, clean=False)
        raise
    D.teardown(layout)
