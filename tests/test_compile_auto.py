"""``--compile auto`` (the default): the pay-back rule, the per-workload measurements it keeps, the training loop
compiling at the second step only when the rule says so, and the compile cache reused by a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from amer.config import ConfigError, TrainConfig, from_dict
from amer.training import compile_auto
from amer.training.compile_auto import FIRST_GUESS_PER_GRAPH_S, Estimate, Timer, decide, estimate, record


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_warm_up_must_be_paid_back_by_the_steps_left() -> None:
    est = Estimate(warmup_s=30.0, speedup=1.5, measured=True)  # a compiled step saves a third of an eager one
    assert decide(1000, 0.1, est).compile  # 1000 x 0.1 s / 3 = 33 s > 30 s
    assert not decide(800, 0.1, est).compile  # 27 s < 30 s
    assert decide(1000, 0.1, est).saved_s == pytest.approx(1000 * 0.1 / 3)
    assert not decide(10**9, 0.1, Estimate(30.0, 1.0, True)).compile  # no speedup: never worth it
    line = decide(800, 0.1, est).describe(800, 0.1)
    assert line.startswith("compile auto: off") and "800 steps x 100 ms" in line and "measured" in line


def test_measurements_are_kept_per_workload_and_a_damaged_file_is_a_first_guess(cache) -> None:
    key = compile_auto.workload_key({"pattern": "AE"}, batch=8, seq_len=256)
    assert key != compile_auto.workload_key({"pattern": "AE"}, batch=8, seq_len=512)
    assert estimate(key, 3) == Estimate(3 * FIRST_GUESS_PER_GRAPH_S, compile_auto.FIRST_GUESS_SPEEDUP, False)
    record(key, 12.5, 1.4)
    assert estimate(key, 3) == Estimate(12.5, 1.4, True)
    assert not estimate("another", 1).measured
    (cache / compile_auto.TIMINGS).write_text("{not json")
    assert not estimate(key, 3).measured
    record(key, 2.0, 1.2)  # a damaged file is replaced, not appended to
    assert json.loads((cache / compile_auto.TIMINGS).read_text()) == {key: {"warmup_s": 2.0, "speedup": 1.2}}


def test_timer_records_after_the_steady_steps(cache) -> None:
    t = Timer("k", eager_step_s=1.0, steady_needed=3)
    assert t.compiled_step(10.5) is None  # the first compiled step: warm-up included
    assert t.compiled_step(0.5) is None and t.compiled_step(0.6) is None
    warmup, speedup = t.compiled_step(0.5)
    assert warmup == pytest.approx(10.0) and speedup == pytest.approx(2.0)
    assert estimate("k", 1) == Estimate(10.0, 2.0, True)


def test_compile_setting_accepts_auto_on_off_and_the_old_booleans() -> None:
    assert TrainConfig().compile == "auto"
    assert from_dict(TrainConfig, {"compile": True}).compile == "on"  # run configs saved before 'auto' existed
    assert from_dict(TrainConfig, {"compile": False}).compile == "off"
    with pytest.raises(ConfigError, match=r"compile must be one of \['auto', 'on', 'off'\]"):
        from_dict(TrainConfig, {"compile": "sometimes"})
    from amer.cli.train import resolve_config

    assert resolve_config(["--compile"])[0].compile == "on"
    assert resolve_config(["--compile", "off"])[0].compile == "off"
    assert resolve_config(["--compile", "auto"])[0].compile == "auto"


def _train(tmp_path, name: str, steps: int, *extra: str) -> int:
    import amer.cli.train as train_cli

    return train_cli.main(["--preset", "tiny", "--out-dir", str(tmp_path), "--run-name", name, "--no-progress",
                           "--no-tensorboard", "--no-curves", "--batch-size", "2", "--seq-len", "32",
                           "--eval-batches", "1", "--steps", str(steps), "--eval-interval", str(steps), *extra])


def test_auto_compiles_from_the_fifth_step_when_it_pays_and_keeps_what_it_measured(tmp_path, cache, monkeypatch,
                                                                                     capsys) -> None:
    """A workload measured to pay (estimate patched: no warm-up, 2x) compiles after the timed eager steps 2 to 4,
    every later step runs the compiled blocks, and after five steady steps its own warm-up and speedup are recorded.
    Negative control: the same run with the first guess (no measurement yet) stays eager and records nothing."""
    import amer.training.compile as compile_mod

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    real = compile_mod.compile_blocks
    monkeypatch.setattr(compile_mod, "compile_blocks", lambda model: real(model, backend=counter))
    assert _train(tmp_path, "first-guess", 11) == 0
    out = capsys.readouterr().out
    assert "compile auto: off" in out and "first guess" in out and counter.frame_count == 0
    assert not (cache / compile_auto.TIMINGS).exists()

    monkeypatch.setattr(compile_mod, "estimate", lambda key, n: Estimate(0.0, 2.0, True))
    assert _train(tmp_path, "pays", 11) == 0
    out = capsys.readouterr().out
    assert "compile auto: on" in out and "compile: 4 blocks regionally compiled" in out
    assert "compile: first compiled step" in out and "kept for the next auto decision" in out
    assert counter.frame_count == 8  # A, E, M, R for training, and again without gradients for the evaluation
    kept = json.loads((cache / compile_auto.TIMINGS).read_text())
    assert len(kept) == 1 and set(next(iter(kept.values()))) == {"warmup_s", "speedup"}
    logged = [json.loads(line) for line in (tmp_path / "pays" / "log.jsonl").read_text().splitlines()]
    assert any("compile/speedup" in r for r in logged) and any(r.get("compile/auto") == 1.0 for r in logged)


def test_off_never_compiles(tmp_path, cache, monkeypatch, capsys) -> None:
    import amer.training.compile as compile_mod

    real = compile_mod.compile_blocks
    monkeypatch.setattr(compile_mod, "compile_blocks", lambda model: real(model, backend="eager"))
    monkeypatch.setattr(compile_mod, "estimate", lambda key, n: Estimate(0.0, 2.0, True))
    assert _train(tmp_path, "off", 6, "--compile", "off") == 0
    out = capsys.readouterr().out
    assert "compile:" not in out and "compile auto" not in out
    assert _train(tmp_path, "no", 6, "--no-compile") == 0
    out = capsys.readouterr().out
    assert "compile:" not in out and "compile auto" not in out
    assert _train(tmp_path, "auto", 6) == 0  # the control: the same run with the default decides, and says so
    assert "compile auto: on" in capsys.readouterr().out


_PROBE = textwrap.dedent("""
    import json, torch
    from torch._dynamo.utils import counters
    from amer.config import ModelConfig
    from amer.model import HybridLM
    from amer.training.compile import compile_blocks
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="M", d_model=32, vocab_size=64, max_seq_len=32))
    compile_blocks(model)  # inductor, the default
    model(torch.zeros(1, 16, dtype=torch.long)).logits.sum().backward()
    print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"]}))
""")


@pytest.mark.slow
def test_a_second_process_reuses_the_compile_cache(tmp_path) -> None:
    """Two processes compile the same block with inductor into amer's cache directory: the first builds every graph
    (misses, no hit: the negative control, showing the counter can read zero), the second loads them all."""
    env = {**os.environ, "AMER_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def probe() -> dict[str, int]:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = probe()
    assert cold["miss"] >= 2 and cold["hit"] == 0, cold  # forward and backward graphs built
    warm = probe()
    assert warm["hit"] == cold["miss"] and warm["miss"] == 0, warm
    assert (tmp_path / "cache" / "inductor").is_dir()


def test_auto_goes_on_eager_when_compiling_fails_and_on_does_not(tmp_path, cache, monkeypatch, capsys) -> None:
    """A backend that fails (as inductor does without a C++ compiler): ``auto`` says why, puts the eager blocks back
    and finishes the run; ``--compile on`` with the same backend stops with the error (the negative control)."""
    import amer.training.compile as compile_mod
    import amer.training.loop as loop_mod

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real = compile_mod.compile_blocks
    monkeypatch.setattr(compile_mod, "compile_blocks", lambda model: real(model, backend=broken))
    monkeypatch.setattr(loop_mod, "compile_blocks", lambda model: real(model, backend=broken))
    monkeypatch.setattr(compile_mod, "estimate", lambda key, n: Estimate(0.0, 2.0, True))
    torch._dynamo.reset()
    assert _train(tmp_path, "falls-back", 7) == 0
    out = capsys.readouterr().out
    assert "compile auto: on" in out and "compiling failed (RuntimeError: no C++ compiler found)" in out
    assert "step 7: val loss" in out
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no C\\+\\+ compiler"):
        _train(tmp_path, "on", 7, "--compile", "on")
