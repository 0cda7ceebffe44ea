"""Multi-process checks of what each rank builds and holds, run under ``torchrun --nproc-per-node 2`` by
``tests/test_scale.py``: ``python -m torch.distributed.run --nproc-per-node 2 tests/distributed/scale_scenarios.py
NAME``. Each prints ``ok <what>`` lines on rank 0 and exits non-zero with the reason when a check fails.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import scenarios
import torch
import torch.distributed as dist
from scenarios import fail

from amer import HybridLM, ModelConfig
from amer.checkpoint import save_checkpoint
from amer.config import ParallelConfig, STPConfig, TrainConfig
from amer.objective import total_loss
from amer.ops import moe_ep
from amer.stp import STPPolicy
from amer.training import distributed as D
from amer.training import scaleout
from amer.training.evaluate import evaluate
from amer.training.optim import make_optimizer
from amer.training.restore import unit_source
from amer.training.sharded_eval import sharded_validate
from amer.training.step import TrainStep, _rows

SEED = 11
VOCAB = 70


def model_config(pattern: str, **moe: object) -> ModelConfig:
    return scenarios.model_config(pattern, vocab=VOCAB, **moe)


def train_config(model: ModelConfig, **parallel: object) -> TrainConfig:
    return TrainConfig(model=model, seed=SEED, seq_len=24, batch_size=4, lr=3e-3,
                       parallel=ParallelConfig(**parallel))  # type: ignore[arg-type]


def batch(rows: int = 4, T: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    return scenarios.batch(rows, T, seed, vocab=VOCAB)


def stp(layers: str = "A-1,M-1,E-1,R-1") -> STPConfig:
    return STPConfig(enabled=True, layers=layers, weight=0.5, start_step=0, ramp_steps=0, n_spans=3)


def say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"ok {msg}", flush=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def everywhere(ok: bool) -> bool:
    t = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def build(tcfg: TrainConfig, policy: STPPolicy, source: object = None) -> scaleout.Scaled:
    layout = D.setup(tcfg.parallel, torch.device("cpu"))
    return scaleout.build(tcfg, layout, HybridLM.empty(tcfg.model), policy, torch.Generator().manual_seed(SEED + 1),
                          source=source)  # type: ignore[arg-type]


def held_weights(scaled: scaleout.Scaled) -> dict[str, torch.Tensor]:
    """What this rank's module holds, whole (shards gathered within their groups), under the model's names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(D.unwrap(scaled.module), options=StateDictOptions(full_state_dict=True))
    out = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    return {scaled.aliases.get(k, k): v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------


def init_layouts() -> None:
    """Every rank builds only its share, and the initial weights equal ``HybridLM(cfg, seed)`` exactly, for dp=2
    (FSDP2 and DDP), pp=2 (tied and untied head) and dp=2 x ep=2; with the units initialised from the global
    generator in construction order instead of their own seeds, a pp=2 stage's weights differ."""
    for tied in (True, False):
        cfg = dataclasses.replace(model_config("AEM|ER"), tie_embeddings=tied)
        ref = HybridLM(cfg, seed=SEED).state_dict()
        policy = STPPolicy(stp(), cfg.parsed)
        for parallel in ({"dp": 2}, {"dp": 2, "data": "ddp"}, {"pp": 2}, {"dp": 2, "ep": 2}):
            if not tied and parallel != {"pp": 2}:
                continue
            scaled = build(train_config(cfg, **parallel), policy)
            got = held_weights(scaled)
            bad = [k for k, v in got.items() if not torch.equal(v, ref[k])]
            local = sum(D.local_tensor(p).numel() for p in D.unwrap(scaled.module).parameters())
            total = sum(v.numel() for v in HybridLM(cfg, seed=SEED).parameters())
            if bad or not got:
                fail(f"{parallel} tied={tied}: {bad[:3]} differ from one process's initial weights")
            if parallel.get("data") != "ddp" and not everywhere(local < total):  # DDP replicates
                fail(f"{parallel}: a rank holds {local} of {total} parameters (not a share)")
            say(f"{parallel} tied={tied}: rank 0 holds {local} of {total} parameters, equal to HybridLM(cfg, seed)")
    cfg = model_config("AEM|ER")
    ref = HybridLM(cfg, seed=SEED).state_dict()
    torch.manual_seed(SEED)
    unseeded = build(train_config(cfg, pp=2), STPPolicy(stp(), cfg.parsed), source=_global_init)
    got = held_weights(unseeded)
    worst = max(relative(v, ref[k]) for k, v in got.items() if k.startswith("blocks."))
    if everywhere(worst < 1e-3):
        fail("control: construction-order initialisation still gives one process's weights")
    say(f"control: initialised in construction order, a stage's blocks differ (by {worst:.3g})")


def _global_init(name: str, module: torch.nn.Module) -> bool:
    """A unit initialised from the global generator, in the order this rank builds its units."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    return True


# ------------------------------------------------------------------------------------------------


def set_bias(module: torch.nn.Module, bias: torch.Tensor | None) -> None:
    """Every expert bias of ``module`` set to ``bias`` (None: left as initialised, at zero)."""
    for m in module.modules():
        if bias is not None and getattr(m, "expert_bias", None) is not None:
            m.expert_bias.copy_(bias)


def reference_grads(cfg: ModelConfig, policy: STPPolicy, data: dict[str, torch.Tensor],
                    bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    model = HybridLM(cfg, seed=SEED)
    set_bias(model, bias)
    out = model(data["tokens"], doc_ids=data["doc_ids"])
    total_loss(policy, out, data["targets"], 5, doc_ids=data["doc_ids"],
               generator=torch.Generator().manual_seed(3)).total.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def sharded_grads(scaled: scaleout.Scaled, policy: STPPolicy, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lay = scaled.layout
    rows = _rows(data["tokens"].shape[0], lay.dp_rank, lay.dp)
    out = scaled.module(data["tokens"][rows], doc_ids=data["doc_ids"][rows])
    total_loss(policy, out, data["targets"][rows], 5, doc_ids=data["doc_ids"], rows=rows,
               generator=torch.Generator().manual_seed(3)).total.backward()
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
            for n, p in D.unwrap(scaled.module).named_parameters() if p.grad is not None}


# a router and experts far from the defaults: sigmoid scores with a selection bias, group-limited choice, raw
# weights scaled, ungated squared-ReLU experts at a latent width, gated shared experts
ROUTER = {"score": "sigmoid", "expert_bias": True, "n_groups": 2, "topk_groups": 1, "renormalize": False,
          "routed_scale": 2.5, "activation": "relu2", "d_latent": 24, "shared_expert": True,
          "shared_expert_gate": True}
CAPACITY = {"dispatch": "capacity", "capacity_factor": 1.0, "capacity_block": 8}
BIAS = torch.tensor([0.3, -0.2, 0.1, -0.4])  # moves the choice of experts (the scores are in (0, 1))


def ep_grads() -> None:
    """dp=2 x ep=2 (each rank holds half the experts, tokens reach them by all-to-all, the rest FSDP2-sharded):
    every gradient equals one process's on the whole batch (relative 1e-5), for dropless and capacity dispatch
    (with drops, budgeted per packed document), with the default router and with the router options of
    :data:`ROUTER` (a non-zero expert bias); without the all-to-all's backward they do not."""
    data = batch()
    for moe in ({}, CAPACITY, ROUTER, {**ROUTER, **CAPACITY}):
        cfg = model_config("AEMER", **moe)
        bias = BIAS if moe.get("expert_bias") else None
        policy = STPPolicy(stp(), cfg.parsed)
        ref = reference_grads(cfg, policy, data, bias)
        one = HybridLM(cfg, seed=SEED)
        set_bias(one, bias)
        dropped = float(one(data["tokens"], doc_ids=data["doc_ids"]).stats["moe/drop_frac"])
        if moe.get("dispatch") and not dropped > 0:
            fail("the capacity case drops nothing: it would not show the drops are one process's")
        scaled = build(train_config(cfg, dp=2, ep=2), policy)
        set_bias(D.unwrap(scaled.module), bias)
        experts = [n for n, p in D.unwrap(scaled.module).named_parameters() if n.endswith("w_down")]
        if not all(D.local_tensor(dict(D.unwrap(scaled.module).named_parameters())[n]).shape[0] == 2 for n in experts):
            fail("the expert weights are not split in two")
        got = sharded_grads(scaled, policy, data)
        if set(got) != set(ref):
            fail(f"ep=2 {moe}: gradients of {sorted(set(ref) ^ set(got))[:3]} missing on one side")
        worst = max(relative(g, ref[n]) for n, g in got.items())
        what = f"{moe.get('dispatch', 'dropless')}{' with router options' if bias is not None else ''}"
        if not worst <= 1e-5:
            name = max(got, key=lambda n: relative(got[n], ref[n]))
            fail(f"ep=2 {what}: {name} gradient differs from one process's by {worst:.3g}")
        say(f"dp=2 x ep=2 {what} ({dropped:.0%} of slots dropped): every gradient equals one process's "
            f"(worst {worst:.2g})")
    cfg = model_config("AEMER")
    policy = STPPolicy(stp(), cfg.parsed)
    ref = reference_grads(cfg, policy, data)
    moe_ep._RETURN_GRADIENTS = False
    try:
        got = sharded_grads(build(train_config(cfg, dp=2, ep=2), policy), policy, data)
    finally:
        moe_ep._RETURN_GRADIENTS = True
    worst = max(relative(got.get(n, torch.zeros_like(g)), g) for n, g in ref.items())
    if not worst > 1e-3:
        fail(f"control: without the all-to-all's backward the gradients still match (worst {worst:.3g})")
    say(f"control: without the all-to-all's backward the gradients differ (by {worst:.3g})")


# ------------------------------------------------------------------------------------------------


def eval_equal() -> None:
    """Sharded evaluation (dp=2 rows, pp=2 stages) gives one process's held-out CE, bits per byte and STP on the
    same weights."""
    cfg = model_config("AEM|ER")
    policy = STPPolicy(stp(), cfg.parsed)
    data = [batch(seed=s) for s in range(3)]
    token_bytes = torch.ones(VOCAB)
    want = evaluate(HybridLM(cfg, seed=SEED), data, stp={"stp": policy}, token_bytes=token_bytes)
    for parallel in ({"dp": 2}, {"pp": 2}):
        scaled = build(train_config(cfg, **parallel), policy)
        got = sharded_validate(scaled, policy, data, dtype="float32", documents=True, token_bytes=token_bytes)
        for key, ref in (("val/loss", want["loss"]), ("val/bpb", want["bpb"]), ("val/stp", want["stp/stp"])):
            if abs(got[key] - ref) > 1e-5 * abs(ref):
                fail(f"{parallel}: {key} {got[key]!r} vs one process {ref!r}")
        say(f"{parallel}: held-out loss, bpb and STP equal one process's")


def ep_bias() -> None:
    """Auxiliary-loss-free balancing under dp=2 x ep=2: after 5 training steps every rank's expert bias equals the
    bias one process reaches on the whole batch (the loads it counts are global, as under dp); with per-rank loads
    the ranks drift apart. And a single-file checkpoint's non-zero bias reaches every rank of a sharded layout
    (a buffer of a sharded unit is copied as its weights are)."""
    cfg = model_config("AEMER", score="sigmoid", expert_bias=True, bias_update_rate=0.05, activation="gelu")
    tcfg = train_config(cfg, dp=2, ep=2)
    # STP on the final state: an intermediate tap under FSDP2 moves a few gradients off one process's for some
    # span draws, which this check of the balancing mechanism must not depend on
    policy = STPPolicy(stp("final"), cfg.parsed)
    steps = [batch(seed=s) for s in range(5)]

    def biases(module: torch.nn.Module) -> torch.Tensor:
        return torch.stack([b for n, b in D.unwrap(module).named_buffers() if n.endswith("expert_bias")])

    one = HybridLM(cfg, seed=SEED)
    run = TrainStep(one, make_optimizer(one, tcfg), policy, grad_clip=tcfg.grad_clip,
                    stp_generator=torch.Generator().manual_seed(SEED + 1), documents=tcfg.packing == "documents")
    for i, b in enumerate(steps):
        run([b], i)
    want = biases(one)
    if not want.abs().sum() > 0:
        fail("the bias did not move in one process")
    scaled = build(tcfg, policy)
    for i, b in enumerate(steps):
        scaled.step_fn([b], i)
    got = biases(scaled.module)
    if not torch.equal(got, want):
        fail(f"dp=2 x ep=2: expert bias after 5 steps differs from one process's by {(got - want).abs().max():.3g}")
    say("dp=2 x ep=2: every rank's expert bias after 5 steps equals one process's")
    # control: each rank counting only its own rows moves its bias its own way
    scaled = build(tcfg, policy)
    for m in D.unwrap(scaled.module).modules():
        if hasattr(m, "stats_group"):
            m.stats_group = None
    for i, b in enumerate(steps):
        scaled.step_fn([b], i)
    mine = biases(scaled.module)
    ranks = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(ranks, mine)
    if torch.equal(ranks[0], ranks[1]):
        fail("control: per-rank loads still give every rank the same bias")
    say("control: per-rank loads give the ranks different biases")
    # a single-file checkpoint's bias, read by every rank of a sharded layout
    box: list[str | None] = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    folder = Path(str(box[0])) / "ck"
    if dist.get_rank() == 0:
        save_checkpoint(folder, one, None, {"step": 5})
    dist.barrier()
    try:
        for parallel in ({"dp": 2}, {"dp": 2, "ep": 2}):
            restored = build(train_config(cfg, **parallel), policy, source=unit_source(folder, HybridLM.empty(cfg)))
            if not everywhere(torch.equal(biases(restored.module), want)):
                fail(f"{parallel}: the checkpoint's expert bias did not reach every rank")
            held = held_weights(restored)
            bad = [k for k, v in one.state_dict().items() if k not in held or not torch.equal(held[k], v)]
            if bad:
                fail(f"{parallel}: {bad[:3]} differ from the checkpoint")
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder.parent)
    say("dp=2 and dp=2 x ep=2 built from a single-file checkpoint hold its weights and non-zero expert bias")


SCENARIOS = {"init_layouts": init_layouts, "ep_grads": ep_grads, "ep_bias": ep_bias, "eval_equal": eval_equal}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        SCENARIOS[sys.argv[1]]()
    except BaseException:
        D.end_process_groups(clean=False)
        raise
    D.end_process_groups()
