"""Regional compilation: one graph per distinct block variant, compiled once for a whole run (the STP gate
opening and ramping included), the same losses as eager; dropless MoE blocks compile on grouped GEMM and stay
eager, saying why, on the reference dispatch."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from amer.bench.workloads import make_batch
from amer.config import ModelConfig, STPConfig
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training.compile import compile_blocks, compiles_block
from amer.training.step import TrainStep

VOCAB = 50


def _run(compiled: bool, steps: int, seq_lens: list[int]) -> tuple[list[float], CompileCounterWithBackend]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # dynamo + AOT autograd, without inductor's C++ build
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="AA", d_model=32, vocab_size=VOCAB, max_seq_len=64))
    if compiled:
        report = compile_blocks(model, backend=counter)
        assert report.compiled == ["A0", "A1"] and not report.eager
    policy = STPPolicy(STPConfig(enabled=True, weight=0.1, start_step=2, ramp_steps=2, layers="A-1"),
                       model.pattern)
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                     stp_generator=torch.Generator().manual_seed(0))
    losses, frames = [], []
    for s in range(steps):
        out = step([make_batch(VOCAB, 2, seq_lens[s], seed=s)], s)
        losses.append(float(out.loss.total.detach()))
        frames.append(counter.frame_count)
    counter.frames_per_step = frames  # type: ignore[attr-defined]
    return losses, counter


def test_no_recompiles_over_a_run_with_the_stp_gate_opening() -> None:
    """Six steps of packed documents: STP gated off (0, 1), ramping (2, 3), on (4, 5). One graph is compiled, in the
    first step, for both A blocks (they read the documents' layout without caching into it) and the losses equal
    eager's. Negative control, a seventh step at a new sequence length: that does recompile, and the counter sees it."""
    T = [32] * 6 + [48]
    eager, _ = _run(False, 6, T)
    losses, counter = _run(True, 7, T)
    frames = counter.frames_per_step
    assert frames[0] == 1 and frames[:6] == [frames[0]] * 6, frames
    assert losses[:6] == pytest.approx(eager, rel=1e-4)
    assert frames[6] > frames[5], frames


def test_dropless_moe_compiles_on_grouped_gemm_and_stays_eager_on_the_reference() -> None:
    from amer.ops import kernels

    cfg = ModelConfig(pattern="AEM", d_model=32, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 4})
    model = HybridLM(cfg)
    assert compiles_block(model.blocks[1]) is None  # torch._grouped_mm: static shapes, no host sync
    report = compile_blocks(model, backend="eager")
    assert report.compiled == ["A0", "E0", "M0"] and not report.eager
    # negative control: forced onto the reference dispatch (host-read slice sizes), the E block stays eager
    with kernels.use("reference"):
        model = HybridLM(cfg)
        assert compiles_block(model.blocks[1]) is not None and compiles_block(model.blocks[0]) is None
        report = compile_blocks(model, backend="eager")
    assert report.compiled == ["A0", "M0"] and report.eager == ["E0"]
    assert "dropless" in report.describe() and "E0" in report.describe() and "forced" in report.describe()
    # widths that are not 16-byte aligned for bf16 rows stay eager too
    odd = HybridLM(ModelConfig(pattern="E", d_model=32, vocab_size=VOCAB, max_seq_len=64,
                               moe={"n_experts": 4, "d_ff": 36}))
    assert "not multiples of 8" in compiles_block(odd.blocks[0])
    # parameter names (and so checkpoints) are unchanged by compilation
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in HybridLM(model.cfg).named_parameters()]
    with torch.no_grad():  # evaluation runs the compiled blocks too
        assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, VOCAB)


@pytest.mark.slow
def test_amer_train_compile_compiles_once_per_block_over_a_whole_run(tmp_path, monkeypatch, capsys) -> None:
    """``amer train --compile`` on the tiny preset (AEMR, dropless E on grouped GEMM): six steps with the STP gate
    opening at step 2 and an evaluation and a checkpoint at steps 3 and 6 compile four training graphs (A, E, M, R)
    in the first step and four evaluation graphs (no gradients) at the first evaluation, then never again."""
    import amer.cli.train as train_cli
    import amer.training.loop as loop_mod

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(loop_mod, "compile_blocks", lambda model: compile_blocks(model, backend=counter))
    at_eval: list[int] = []
    real_evaluate = loop_mod.evaluate

    def counted(*args, **kwargs):  # the compile count as each evaluation starts
        at_eval.append(counter.frame_count)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "evaluate", counted)
    argv = ["--preset", "tiny", "--out-dir", str(tmp_path), "--run-name", "c", "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--steps", "6",
            "--eval-interval", "3", "--stp.start-step", "2", "--stp.ramp-steps", "0", "--compile"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "compile: 4 blocks regionally compiled (fullgraph)" in out and "eager" not in out.split("compile: 4")[1][:40]
    assert "compile: first step" in out
    assert at_eval == [4, 8] and counter.frame_count == 8, (at_eval, counter.frame_count)


@pytest.mark.parametrize("order", ["checkpoint then compile", "compile then checkpoint"])
def test_compile_and_activation_checkpointing_together(order: str) -> None:
    """Checkpointed and compiled blocks, on packed documents, in either order of application: the same gradients as
    the plain eager model, one graph per block variant, no recompile on later steps (the recomputation runs the
    same graph). Negative control: compiling twice is refused, so a wrapper cannot silently stack."""
    from amer.config import ConfigError
    from amer.training.checkpointing import apply_activation_checkpointing

    cfg = ModelConfig(pattern="AMA", d_model=32, vocab_size=VOCAB, max_seq_len=64)
    batch = make_batch(VOCAB, 2, 32, seed=3)

    def grads(model: HybridLM) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(batch["tokens"], doc_ids=batch["doc_ids"]).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    plain = grads(HybridLM(cfg))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(0)
    model = HybridLM(cfg)
    if order == "checkpoint then compile":
        apply_activation_checkpointing(model, "blocks")
        compile_blocks(model, backend=counter)
    else:
        compile_blocks(model, backend=counter)
        apply_activation_checkpointing(model, "blocks")
    assert all(hasattr(b.forward, "amer_checkpointing") for b in model.blocks)
    got = grads(model)
    assert counter.frame_count == 2  # A and M
    assert got.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    grads(model)
    assert counter.frame_count == 2
    with pytest.raises(ConfigError, match="compiled already"):
        compile_blocks(model, backend="eager")
