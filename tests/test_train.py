"""The training job end to end on the tiny preset: learning, logs, the STP gate, exact resume, NaN guard,
every data format, bf16.

Runs are driven through ``amer.cli.train.main`` (what ``python train.py`` runs) with small step counts, so
each takes about a second; the one 40-step run that checks learning is shared by the tests reading its
logs. Failure modes guarded here are the quiet ones: STP that never switches on (or is on from step 0),
a resume that drifts from the uninterrupted run, a NaN step that is applied anyway or that ends up in a
checkpoint, a log that lacks the per-family figures the README promises.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import amer.cli.train as train_cli
import amer.objective as objective_mod
import amer.training.loop as loop_mod
from amer.checkpoint import list_checkpoints, read_checkpoint
from amer.model import HybridLM

NLRX = Path("/work/shared/data/nl-rx-synth/synth_train.jsonl")
TINY_BOUNDARIES = ["embed->A", "A->E", "E->M", "M->R", "R->final"]  # the tiny preset's pattern is AEMR


def run(out: Path, name: str, *extra: str, expect: int = 0) -> Path:
    """Train the tiny preset briefly (batch 2 x 32 tokens unless ``extra`` says otherwise)."""
    argv = ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", *extra]
    rc = train_cli.main(argv)
    assert rc == expect, f"amer train {' '.join(argv)} exited {rc}"
    return out / name


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in log_lines(run_dir) if "ce" in r]


# ---------------------------------------------------------------- a real (tiny) run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset as shipped: 40 steps of 4 x 64 tokens on kjv, STP gated on at step 10, TensorBoard on."""
    out = tmp_path_factory.mktemp("tiny")
    assert train_cli.main(["--preset", "tiny", "--out-dir", str(out), "--run-name", "r", "--no-progress"]) == 0
    return out / "r"


def test_training_and_validation_loss_fall(tiny_run: Path) -> None:
    lines = train_lines(tiny_run)
    assert [r["step"] for r in lines] == list(range(5, 41, 5))
    first, last = lines[0]["ce"], lines[-1]["ce"]
    assert last < first - 1.0, f"training loss {first:.3f} -> {last:.3f}"
    assert first < math.log(260) + 0.5  # starts near uniform over the byte vocabulary, not blown up
    val = [r for r in log_lines(tiny_run) if "val/loss" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val/loss"] < val[0]["val/loss"] - 0.1, val
    assert "val/stp" in val[0]
    # bytes: bits per byte is the CE of the byte targets in bits (BOS/EOS targets, ~1 in 200 here, left out)
    assert all(abs(r["val/bpb"] - r["val/loss"] / math.log(2)) < 0.05 * r["val/bpb"] for r in val), val


def test_log_lines_carry_every_figure(tiny_run: Path) -> None:
    required = ["step", "lr", "ce", "stp", "stp/coeff", "stp/live_grad_norm", "tokens_per_s", "moe/load_max",
                "moe/drop_frac"]
    required += [f"stp/{f}" for f in "AEMR"] + [f"stp/{f}0" for f in "AEMR"]
    required += [f"curv/tok/{f}" for f in "AEMR"] + [f"curv/depth/{b}" for b in TINY_BOUNDARIES]
    for rec in train_lines(tiny_run):
        missing = [k for k in required if k not in rec]
        assert not missing, f"step {rec['step']} lacks {missing}"
        bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
        assert not bad, f"step {rec['step']}: non-finite {bad}"
        assert rec["tokens_per_s"] > 0 and rec["lr"] > 0
        assert 0.0 <= rec["moe/drop_frac"] <= 1.0 and rec["moe/load_max"] >= 1.0  # max/mean load


def test_tensorboard_gets_the_same_scalars(tiny_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(tiny_run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tiny_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"ce", "stp/coeff", "stp/live_grad_norm", "curv/depth/A->E", "moe/load_max", "val/loss"} <= tags
    ce = {e.step: e.value for e in acc.Scalars("ce")}
    assert ce == pytest.approx({r["step"]: r["ce"] for r in train_lines(tiny_run)})


def test_stp_gate_off_before_start_step_and_live_after(tiny_run: Path) -> None:
    cfg = json.loads((tiny_run / "config.json").read_text())["stp"]
    assert cfg["enabled"] and cfg["start_step"] == 10
    before = [r for r in train_lines(tiny_run) if r["step"] <= cfg["start_step"]]
    after = [r for r in train_lines(tiny_run) if r["step"] > cfg["start_step"]]
    assert len(before) >= 2 and len(after) >= 2
    for r in before:
        assert r["stp/coeff"] == 0.0 and r["stp/live_grad_norm"] == 0.0, r["step"]
        assert r["stp"] > 0  # measured (for the log) even while gated off
    for r in after:
        assert r["stp/coeff"] > 0 and r["stp/live_grad_norm"] > 0, r["step"]
    assert after[-1]["stp/coeff"] == pytest.approx(cfg["weight"])  # the ramp (5 steps) has ended


# ---------------------------------------------------------------- resume


RESUME_ARGS = ("--steps", "12", "--log-interval", "1", "--eval-interval", "5", "--grad-accum", "2",
               "--stp.start-step", "3", "--stp.ramp-steps", "2", "--warmup-steps", "2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("full"), "full", *RESUME_ARGS)


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    weights, optim, meta = read_checkpoint(run_dir)
    assert meta["step"] == 12
    return weights, optim


@pytest.mark.parametrize("crash", [False, True], ids=["stop-at", "crash-after-checkpoint"])
def test_resume_is_bit_identical(tmp_path: Path, uninterrupted: Path, crash: bool) -> None:
    """--stop-at 7 then --resume to 12 reproduces the uninterrupted run exactly: every logged loss,
    the STP figures, the final weights and AdamW moments. ``crash``: the run got to step 7 but its last
    checkpoint is step 5 (step 7's was lost), so the resumed run redoes steps 6-7 and must log them once."""
    part = run(tmp_path, "part", *RESUME_ARGS, "--stop-at", "7")
    assert [p.name for p in list_checkpoints(part)][-1] == "step_000007"
    if crash:
        import shutil

        shutil.rmtree(part / "step_000007")
    assert train_cli.main(["--resume", str(part), "--no-progress"]) == 0

    full_lines, part_lines = train_lines(uninterrupted), train_lines(part)
    assert [r["step"] for r in part_lines] == list(range(1, 13)), "each step logged exactly once"
    keys = ["loss", "ce", "aux", "aux/moe_lb", "aux/moe_z", "stp", "stp/coeff", "grad_norm", "stp/live_grad_norm",
            "curv/depth/A->E"]
    for a, b in zip(full_lines, part_lines):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, f"step {a['step']} differs"
    assert part_lines[3]["stp/coeff"] > 0  # STP was on across the cut: its sampler state was restored

    (w_full, o_full), (w_part, o_part) = _final_state(uninterrupted), _final_state(part)
    assert w_full.keys() == w_part.keys() and o_full.keys() == o_part.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_part[k]), k
    for k in o_full:
        assert torch.equal(o_full[k], o_part[k]), k


def test_resume_of_finished_run_changes_nothing(tmp_path: Path) -> None:
    done = run(tmp_path, "done", "--steps", "2", "--eval-interval", "2")
    before = (done / "log.jsonl").read_text(), read_checkpoint(done)[0]
    assert train_cli.main(["--resume", str(done), "--no-progress"]) == 0
    assert (done / "log.jsonl").read_text() == before[0]
    after = read_checkpoint(done)[0]
    assert all(torch.equal(before[1][k], after[k]) for k in after)


# ---------------------------------------------------------------- non-finite losses


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is poisoned (an overflow in backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


def _nan_on(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | int,
            where: str = "loss") -> tuple[list[HybridLM], list[dict]]:
    """Make the training cross-entropy NaN (``where="loss"``) or its gradient NaN (``"gradient"``) on the given
    training forward passes (0-based; an int: from then on), and record the model's weights as each training
    forward pass sees them."""
    built: list[HybridLM] = []
    seen: list[dict] = []

    class Recording(HybridLM):
        def __init__(self, cfg, **kwargs) -> None:
            super().__init__(cfg, **kwargs)
            built.append(self)

    real = objective_mod.cross_entropy

    def ce(logits, targets, ignore_index=-100):
        loss = real(logits, targets, ignore_index)
        if not torch.is_grad_enabled():  # validation
            return loss
        i = len(seen)
        seen.append({k: v.detach().clone() for k, v in built[0].state_dict().items()})
        hit = i in bad_calls if isinstance(bad_calls, set) else i >= bad_calls
        if not hit:
            return loss
        return loss * float("nan") if where == "loss" else _NaNGradient.apply(loss)

    monkeypatch.setattr(loop_mod, "HybridLM", Recording)
    monkeypatch.setattr(objective_mod, "cross_entropy", ce)
    return built, seen


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nan_step_is_skipped_not_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    _, seen = _nan_on(monkeypatch, {3, 4}, where)
    r = run(tmp_path, "r", "--steps", "7", "--log-interval", "1", "--eval-interval", "7", "--max-bad-steps", "3")
    assert len(seen) == 7
    assert not _same(seen[2], seen[3]), "a normal step changes the weights"
    assert _same(seen[3], seen[4]) and _same(seen[4], seen[5]), "a NaN step must leave the weights untouched"
    assert not _same(seen[5], seen[6]), "training resumes after the bad steps"
    lines = log_lines(r)
    skipped = [x for x in lines if x.get("skipped")]
    assert [x["step"] for x in skipped] == [4, 5] and all(where in x["skipped_reason"] for x in skipped)
    assert [x["step"] for x in lines if "ce" in x] == [1, 2, 3, 6, 7]
    weights = read_checkpoint(r)[0]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_repeated_nan_stops_the_run_without_a_nan_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    _nan_on(monkeypatch, 5)
    r = run(tmp_path, "r", "--steps", "20", "--eval-interval", "2", "--max-bad-steps", "3", expect=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 consecutive non-finite steps at step 8" in err[0], err
    assert "step_000004" in err[0]  # names the last good checkpoint
    assert [p.name for p in list_checkpoints(r)] == ["step_000002", "step_000004"]
    for ck in [*list_checkpoints(r), r / "best"]:
        assert all(torch.isfinite(v).all() for v in read_checkpoint(ck)[0].values()), ck


def test_update_that_makes_weights_nan_is_never_checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The loss was finite but the optimizer step produced NaN weights (e.g. an inf in a moment)."""
    real = loop_mod.make_optimizer

    def poisoned(model, cfg):
        opt = real(model, cfg)
        step = opt.step

        def bad_step(*a, **kw):
            out = step(*a, **kw)
            if opt.state[model.embed.weight]["step"] >= 3:
                with torch.no_grad():
                    model.embed.weight[0, 0] = float("nan")
            return out

        opt.step = bad_step
        return opt

    monkeypatch.setattr(loop_mod, "make_optimizer", poisoned)
    r = run(tmp_path, "r", "--steps", "6", "--eval-interval", "3", expect=1)
    assert "non-finite" in capsys.readouterr().err
    assert list_checkpoints(r) == [] and not (r / "best").exists()


# ---------------------------------------------------------------- data formats and dtypes


def _write_corpus(tmp_path: Path, kind: str) -> Path:
    para = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n") * 4  # ~1.1 kB
    if kind == "text":
        p = tmp_path / "corpus.txt"
        p.write_text(para * 3)
    elif kind == "directory":
        p = tmp_path / "corpus"
        (p / "sub").mkdir(parents=True)
        for i in range(3):
            (p / f"doc{i}.txt").write_text(f"document {i}\n" + para)
        (p / "sub" / "notes.md").write_text("# notes\n" + para)
        (p / "ignored.bin").write_bytes(b"\x00" * 10)
    elif kind == "jsonl":
        p = tmp_path / "corpus.jsonl"
        p.write_text("".join(json.dumps({"text": f"record {i}: " + para[: 300 + i]}) + "\n" for i in range(12)))
    else:  # chat JSONL as in nl-rx-synth
        p = tmp_path / "chat.jsonl"
        if NLRX.is_file():
            with NLRX.open() as f:
                p.write_text("".join(next(f) for _ in range(60)))
        else:
            p.write_text("".join(json.dumps({"messages": [
                {"role": "system", "content": "Convert natural language to regular expression."},
                {"role": "user", "content": f"lines with the number {i}"},
                {"role": "assistant", "content": f".*{i}.*"}]}) + "\n" for i in range(60)))
    return p


@pytest.mark.parametrize("kind", ["text", "directory", "jsonl", "chat"])
def test_each_data_format_trains(tmp_path: Path, kind: str) -> None:
    data = _write_corpus(tmp_path, kind)
    r = run(tmp_path, "r", "--data", str(data), "--steps", "2", "--log-interval", "1", "--eval-interval", "2",
            "--seq-len", "16", "--val-fraction", "0.2")
    lines = train_lines(r)
    assert [x["step"] for x in lines] == [1, 2] and all(math.isfinite(x["ce"]) for x in lines)
    assert json.loads((r / "config.json").read_text())["data"] == str(data)
    assert any("val/loss" in x for x in log_lines(r))


def test_bfloat16_autocast_runs_with_finite_loss(tmp_path: Path) -> None:
    r = run(tmp_path, "r", "--dtype", "bfloat16", "--steps", "3", "--log-interval", "1", "--eval-interval", "3",
            "--stp.start-step", "1", "--eval-batches", "1")
    lines = train_lines(r)
    assert len(lines) == 3 and all(math.isfinite(x["ce"]) and math.isfinite(x["stp"]) for x in lines)
    assert lines[-1]["stp/live_grad_norm"] > 0
    weights = read_checkpoint(r)[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())  # master weights
