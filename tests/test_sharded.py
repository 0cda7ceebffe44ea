"""Sharded checkpoints (torch.distributed.checkpoint) in one process: written, consolidated by every reader, resumed
into a plain model and optimizer; per-unit initialisation; and the planner's account (fast checks; the
multi-process ones are in tests/test_scale.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from amer import HybridLM, ModelConfig, load_checkpoint, sharded
from amer.checkpoint import (
    checkpoint_files,
    list_checkpoints,
    read_checkpoint,
    read_meta,
    restore_optimizer,
    save_sharded_checkpoint,
)
from amer.config import TrainConfig, to_dict
from amer.errors import CheckpointError, ConfigError
from amer.model import unit_seed
from amer.training.optim import make_optimizer
from amer.training.planner import GiB, PlanLayout, cut_pattern, plan, suggest, trace_activations
from amer.training.restore import restore_sharded

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(pattern="AEMR", d_model=32, vocab_size=64, max_seq_len=64,
                  attention={"n_heads": 4, "n_kv_heads": 2}, mamba={"d_state": 8, "head_dim": 16, "chunk_size": 8},
                  moe={"n_experts": 4, "top_k": 2, "d_ff": 48}, recurrent={"n_heads": 2})


def curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["ce"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "ce" in r}


def trained(seed: int = 0) -> tuple[HybridLM, torch.optim.Optimizer]:
    model = HybridLM(CFG, seed=seed)
    opt = make_optimizer(model, TrainConfig(model=CFG, seq_len=16))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(tokens).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_initialisation_depends_on_the_seed_and_the_unit_alone() -> None:
    """A unit's weights are a function of (seed, unit name): rebuilding the model, or re-initialising one block
    alone on its seed, gives the same tensors; another seed or another name gives others."""
    a, b = HybridLM(CFG, seed=3), HybridLM(CFG, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    alone = HybridLM(CFG, seed=3)
    for p in alone.blocks[2].parameters():
        p.data.fill_(7.0)
    unit = next(u for u in alone.init_units() if u.name == "blocks.2")
    torch.manual_seed(unit_seed(3, "blocks.2"))
    unit.init(unit.module)
    assert all(torch.equal(x, y) for x, y in zip(alone.blocks[2].parameters(), a.blocks[2].parameters()))
    other = HybridLM(CFG, seed=4)  # control: the seed matters
    assert not torch.equal(other.blocks[1].mixer.w_gate_up, a.blocks[1].mixer.w_gate_up)
    assert unit_seed(3, "blocks.2") != unit_seed(3, "blocks.3")


def test_a_sharded_checkpoint_reads_back_in_one_process(tmp_path: Path) -> None:
    """Written with DCP (here by one process), a sharded checkpoint is read by read_checkpoint and
    load_checkpoint (weights consolidated), and resumes into a fresh model and optimizer exactly."""
    model, opt = trained()
    meta = {"config": {"model": to_dict(CFG)}, "step": 1}
    save_sharded_checkpoint(tmp_path / "step_000001", sharded.state_dicts(model, opt), meta)
    ck = tmp_path / "step_000001"
    assert sharded.is_sharded(ck) and sharded.has_optimizer(ck)
    assert {".metadata", "__0_0.distcp", "meta.json"} <= set(checkpoint_files(ck)) & {p.name for p in ck.iterdir()}
    assert list_checkpoints(tmp_path) == [ck]
    weights, optim, _ = read_checkpoint(ck)
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert optim is None and set(weights) == set(want)
    assert all(torch.equal(weights[k], v) for k, v in want.items())
    loaded, _ = load_checkpoint(ck)
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    fresh, fresh_opt = trained(seed=9)  # other weights and moments: everything must come from the checkpoint
    restore_sharded(ck, fresh, fresh_opt, print)
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), model.state_dict().values()))
    for p, q in zip(fresh.parameters(), model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_opt.state[p][key], opt.state[q][key]), key


def test_a_sharded_checkpoint_missing_a_shard_is_a_checkpoint_error(tmp_path: Path) -> None:
    model, opt = trained()
    ck = save_sharded_checkpoint(tmp_path / "step_000001", sharded.state_dicts(model, opt),
                                 {"config": {"model": to_dict(CFG)}, "step": 1})
    (ck / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="step_000001"):
        load_checkpoint(ck)


@pytest.mark.slow
def test_single_process_training_resumes_from_a_sharded_checkpoint(tmp_path: Path) -> None:
    """A run directory whose latest checkpoint is sharded (as a torchrun run writes it) resumes in one process and
    continues with the losses of an uninterrupted run; its later checkpoints are single-file again."""
    common = [sys.executable, "train.py", "--preset", "tiny", "--no-progress", "--no-tensorboard", "--no-curves",
              "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--log-interval", "1", "--eval-interval", "2",
              "--eval-batches", "2", "--out-dir", str(tmp_path), "--stp.start-step", "1"]
    run = lambda *a: subprocess.run([*common, *a], cwd=ROOT, capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("--run-name", "whole").returncode == 0
    assert run("--run-name", "cut", "--stop-at", "2").returncode == 0
    ck = tmp_path / "cut" / "step_000002"
    model, cfg = load_checkpoint(ck)  # the single-file checkpoint, rewritten as shards in its place
    opt = make_optimizer(model, TrainConfig(model=cfg, seq_len=32))
    restore_optimizer(opt, read_checkpoint(ck)[1], read_meta(ck), model)
    for f in ("model.safetensors", "optim.safetensors"):
        (ck / f).unlink()
    sharded.write(ck, sharded.state_dicts(model, opt))
    assert sharded.is_sharded(ck)
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "cut"), "--no-progress"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole, cut = curve(tmp_path / "whole"), curve(tmp_path / "cut")
    assert set(cut) == {1, 2, 3, 4}
    assert all(abs(cut[s] - whole[s]) <= 1e-5 * abs(whole[s]) for s in (3, 4)), (cut, whole)
    assert (tmp_path / "cut" / "step_000004" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# the planner


def test_trace_counts_what_autograd_saves() -> None:
    """The fake-tensor trace equals a real forward's saved tensors, and grows with the rows."""
    acts = trace_activations(CFG, 2, 32)
    model = HybridLM(CFG, seed=0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    from amer.objective import cross_entropy

    tokens = torch.zeros(2, 32, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(model(tokens, taps=False, head=False), tokens)
    assert sum(acts.values()) == pytest.approx(total, rel=1e-6)
    assert set(acts) >= {"embed", "blocks.0", "blocks.3", "head"} or set(acts) >= {"blocks.0", "blocks.3", "head"}
    assert sum(trace_activations(CFG, 4, 32).values()) > 1.9 * sum(acts.values())


def test_plan_splits_what_the_layout_splits() -> None:
    one = plan(CFG, PlanLayout(batch=4, seq_len=32), GiB)
    fsdp = plan(CFG, PlanLayout(dp=2, batch=4, seq_len=32), GiB)
    ep = plan(CFG, PlanLayout(dp=2, ep=2, batch=4, seq_len=32), GiB)
    ddp = plan(CFG, PlanLayout(dp=2, batch=4, seq_len=32, data="ddp"), GiB)
    p1 = one.stages[0].params
    assert fsdp.stages[0].params == pytest.approx(p1 / 2) and ep.stages[0].params == pytest.approx(p1 / 2)
    assert ddp.stages[0].params == pytest.approx(p1)
    assert fsdp.stages[0].activations < one.stages[0].activations
    ckpt = plan(CFG, PlanLayout(batch=4, seq_len=32, checkpointing="blocks"), GiB)
    assert ckpt.stages[0].activations < one.stages[0].activations and ckpt.flops_per_step > one.flops_per_step
    pp = plan(CFG, PlanLayout(pp=2, microbatches=4, batch=8, seq_len=32), GiB)
    gpipe = plan(CFG, PlanLayout(pp=2, microbatches=4, schedule="gpipe", batch=8, seq_len=32), GiB)
    assert [s.in_flight for s in pp.stages] == [2, 1] and [s.in_flight for s in gpipe.stages] == [4, 4]
    assert pp.pattern == "AE|MR" and "|" not in one.pattern
    assert one.flops_per_step > 0 and one.fits and not plan(CFG, PlanLayout(batch=4, seq_len=32), 1e5).fits


def test_suggest_finds_the_smallest_fitting_layout() -> None:
    base = PlanLayout(batch=8, seq_len=32)
    need = plan(CFG, base, GiB).peak
    ckpt = plan(CFG, replace(base, checkpointing="blocks"), GiB).peak
    best = suggest(CFG, base, need * 0.9, headroom=0.0)  # one device, recomputing, fits
    assert best is not None and best.layout.world == 1 and best.layout.checkpointing != "none"
    best = suggest(CFG, base, ckpt * 0.8, headroom=0.0)  # not even recomputing fits one device
    assert best is not None and best.fits and best.layout.world >= 2
    assert suggest(CFG, PlanLayout(batch=8, seq_len=32), 1e3, max_world=8) is None


def test_cut_pattern_and_bad_layouts() -> None:
    assert cut_pattern(replace(CFG, pattern="AEMRAEMRA"), 3).parsed.letters == "AEM|RAE|MRA"
    with pytest.raises(ConfigError, match="must divide"):
        plan(CFG, PlanLayout(dp=2, ep=3, batch=4), GiB)
    with pytest.raises(ConfigError, match="microbatches"):
        plan(CFG, PlanLayout(pp=2, microbatches=3, batch=4), GiB)


@pytest.mark.slow
def test_amer_plan_prints_a_plan_and_a_suggestion() -> None:
    proc = subprocess.run([sys.executable, "-m", "amer.cli", "plan", "--preset", "tiny", "--batch-size", "8",
                           "--seq-len", "64", "--device-memory", "0.001"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "does NOT fit" in proc.stdout and "smallest layout that fits" in proc.stdout, proc.stdout
    bad = subprocess.run([sys.executable, "-m", "amer.cli", "plan", "--dp", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--dp must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
