"""Activation checkpointing applied from outside the model: same loss and gradients (STP through the taps of
checkpointed blocks included, packed documents too), less activation memory, evaluation untouched."""

from __future__ import annotations

import pytest
import torch

from amer.bench.harness import peak_tensor_bytes
from amer.config import ConfigError, ModelConfig, STPConfig, TrainConfig, from_dict
from amer.model import HybridLM
from amer.objective import total_loss
from amer.stp import STPPolicy
from amer.training.checkpointing import MODES, apply_activation_checkpointing

VOCAB, T = 61, 40


def _model(mode: str, pattern: str = "AEMR") -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern=pattern, d_model=32, vocab_size=VOCAB, max_seq_len=256)).double()
    apply_activation_checkpointing(model, mode)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, T), generator=g)
    doc_ids = (torch.arange(T) // 13).expand(2, T)  # three packed documents a row
    return tokens, torch.roll(tokens, -1, 1), doc_ids


def _grads(model: HybridLM, *, ce: bool):
    tokens, targets, doc_ids = _batch()
    policy = STPPolicy(STPConfig(enabled=True, weight=1.0, layers="A-1,E-1,M-1,R-1"), model.pattern)
    out = model(tokens, doc_ids=doc_ids, head=False)
    assert all(t.hidden.grad_fn is not None for t in out.taps.select("A-1,E-1,M-1,R-1"))  # taps on the graph
    stp, _ = policy.stp_loss(out.taps, doc_ids=doc_ids, generator=torch.Generator().manual_seed(2))
    if ce:
        stp = total_loss(policy, out, targets, 10**6, doc_ids=doc_ids, generator=torch.Generator().manual_seed(2)).total
    loss = stp
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return float(loss.detach()), dict(zip(names, grads))


@pytest.mark.parametrize("mode", ["blocks", "selective"])
@pytest.mark.parametrize("ce", [False, True])
def test_gradients_equal_uncheckpointed(mode: str, ce: bool) -> None:
    """STP alone (the gradient reaches each block only through its tap, the recomputed output) and the full
    objective: every parameter's gradient equals the uncheckpointed model's."""
    ref_loss, ref = _grads(_model("none"), ce=ce)
    loss, got = _grads(_model(mode), ce=ce)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name, g in ref.items():
        if g is None:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
    # the STP gradient reaches the checkpointed blocks' weights (through their taps)
    assert all(got[n].abs().sum() > 0 for n in got if n.startswith("blocks.0.mixer.") and got[n] is not None)


def test_negative_control_a_different_model_differs() -> None:
    """The comparison above can fail: a checkpointed model with one weight changed gives other gradients."""
    _, ref = _grads(_model("none"), ce=False)
    model = _model("blocks")
    with torch.no_grad():
        next(model.blocks[1].parameters()).mul_(1.01)
    _, got = _grads(model, ce=False)
    assert any(not torch.allclose(got[n], g) for n, g in ref.items() if g is not None)


def test_checkpointing_lowers_activation_memory() -> None:
    """Peak live tensor bytes of forward + backward: both modes below no checkpointing; 'none' twice is
    equal (the measurement itself does not drift)."""
    tokens, targets, doc_ids = _batch()
    tokens, targets, doc_ids = tokens.repeat(2, 6), targets.repeat(2, 6), doc_ids.repeat(2, 6)

    def step(model: HybridLM):
        def run():
            out = model(tokens, doc_ids=doc_ids, taps=False)
            torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten()).backward()
            model.zero_grad(set_to_none=True)
        run()
        return peak_tensor_bytes(run)

    peaks = {mode: step(_model(mode, "AMRAMR").float()) for mode in MODES}
    assert step(_model("none", "AMRAMR").float()) == peaks["none"]
    assert peaks["blocks"] < 0.75 * peaks["none"], peaks
    assert peaks["selective"] < peaks["none"], peaks


def test_evaluation_and_decoding_run_plainly() -> None:
    ref, model = _model("none"), _model("blocks")
    tokens, _, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, ref(tokens).logits)
        cache = model.init_cache(2, T)
        step = model(tokens[:, :5], cache=cache)
        torch.testing.assert_close(step.logits, ref(tokens[:, :5]).logits)


def test_bad_mode_and_double_application_are_refused() -> None:
    with pytest.raises(ConfigError, match="not one of none, blocks, selective"):
        apply_activation_checkpointing(_model("none"), "everything")
    with pytest.raises(ConfigError, match="already applied"):
        apply_activation_checkpointing(_model("blocks"), "selective")
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        from_dict(TrainConfig, {"activation_checkpointing": "everything"})
    assert apply_activation_checkpointing(_model("none"), "none") == 0


def _train(out, name: str, *extra: str) -> list[float]:
    import json

    import amer.cli.train as train_cli

    argv = ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--steps", "4",
            "--log-interval", "1", "--eval-interval", "4", "--stp.start-step", "2", "--stp.ramp-steps", "0", *extra]
    assert train_cli.main(argv) == 0
    lines = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "ce" in r]


def test_amer_train_with_checkpointing_trains_the_same(tmp_path) -> None:
    """``amer train --activation-checkpointing``: the same losses step by step as without (STP gated on at
    step 2, packed documents), to fp32 tolerance."""
    ref = _train(tmp_path, "none")
    for mode in ("blocks", "selective"):
        assert _train(tmp_path, mode, "--activation-checkpointing", mode) == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_bench_suite_checkpointing_reports_every_mode() -> None:
    from amer.bench import BenchOptions, run_suite

    res = run_suite("checkpointing", BenchOptions(repeats=1, warmup=0, quick=True))
    assert [r["name"] for r in res.rows] == list(MODES)
    assert all(r["peak_MB"] > 0 and r["ms"] > 0 for r in res.rows)
    assert res.rows[1]["peak_MB"] < res.rows[0]["peak_MB"]
