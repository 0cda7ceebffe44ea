"""Scale-out on CPU: two processes under torchrun with gloo (data parallel, pipeline stages, resume across
layouts) against one process, and the layout's bad input.

The mechanism checks (gradients, parameters, the seam's negative control) run in
``tests/distributed/scenarios.py``; the runs here go through ``train.py`` exactly as a user launches it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import launch as launcher
import pytest
from launch import ROOT, curve, ok
from launch import env as _env

pytestmark = pytest.mark.slow
TINY = ["--preset", "tiny", "--pattern", "AE|MR", "--no-progress", "--no-tensorboard", "--no-curves", "--seq-len", "32"]


def torchrun(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return launcher.torchrun(2, *args, extra=env, timeout=timeout)


def single(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return launcher.single(*args, timeout=timeout)


def assert_same_curve(got: dict[int, float], want: dict[int, float], tol: float, what: str) -> None:
    assert got and set(got) == set(want), f"{what}: steps {sorted(got)} vs {sorted(want)}"
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst <= tol, f"{what}: curves differ by {worst:.2e} (relative) > {tol}: {got} vs {want}"


# ------------------------------------------------------------------------------------------------
# mechanisms


@pytest.mark.parametrize("scenario,checks", [("pp_grads", 7), ("pp_parallel", 1), ("pp_shared", 2), ("dp_shared", 2),
                                             ("dp_equal", 3), ("dp_bias", 3)])
def test_scenario(scenario: str, checks: int) -> None:
    """pp_grads: pp=2 gradients of both stages equal one process's for GPipe (1, 2, 4 microbatches) and 1F1B
    (2, 4; and 2 with the span form of STP), with STP taps on both sides and MoE losses, and with the seam
    disabled they do not.
    pp_parallel: pp=2 with a parallel layer on each stage, STP on branch and layer taps: gradients equal one
    process's.
    pp_shared: pp=2 with a shared block on both stages: its gradient on each equals one process's (the tied-gradient
    group), and without the group it does not. dp_shared: dp=2 (FSDP2, DDP) with a shared block used three times
    gives one process's parameters.
    dp_equal: dp=2 (FSDP2 and DDP) parameters after 5 steps equal one process with the whole batch, and
    without the global MoE statistics they do not.
    dp_bias: dp=2 (FSDP2 and DDP) MoE expert biases (auxiliary-loss-free balancing) after 5 steps equal one
    process's on every rank, and with per-rank loads the ranks disagree."""
    proc = ok(torchrun("tests/distributed/scenarios.py", scenario))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == checks, proc.stdout


# ------------------------------------------------------------------------------------------------
# training runs through train.py


def test_pipeline_run_follows_one_process(tmp_path: Path) -> None:
    """20 steps with pp=2 (2 microbatches of 2 rows) trace the loss curve of one process accumulating the
    same two micro-batches, through the STP gate opening at step 10 and its ramp."""
    common = [*TINY, "--steps", "20", "--log-interval", "1", "--eval-interval", "10", "--out-dir", str(tmp_path),
              "--stp.start-step", "10", "--stp.ramp-steps", "5"]
    # the same 32 held-out rows: validation reads --eval-batches batches of --batch-size rows
    ok(single(*common, "--run-name", "one", "--batch-size", "2", "--grad-accum", "2", "--eval-batches", "16"))
    ok(torchrun("train.py", *common, "--run-name", "pp", "--batch-size", "4", "--parallel.pp", "2",
                "--parallel.microbatches", "2", "--eval-batches", "8"))
    want, got = curve(tmp_path / "one"), curve(tmp_path / "pp")
    assert_same_curve(got, want, 1e-4, "pp=2 vs one process")
    assert curve(tmp_path / "pp", "stp/coeff")[20] > 0 and curve(tmp_path / "pp", "stp/coeff")[9] == 0
    assert curve(tmp_path / "pp", "stp/live_grad_norm")[20] > 0  # the STP term reaches the taps after the gate
    logged = json.loads((tmp_path / "pp" / "log.jsonl").read_text().splitlines()[-2])
    assert {"stp/A0", "stp/M0", "stp/E0", "stp/R0", "stp/A", "curv/tok/A"} <= set(logged)  # global tap names
    assert_same_curve(curve(tmp_path / "pp", "val/loss"), curve(tmp_path / "one", "val/loss"), 1e-4, "val")


def test_pipeline_run_with_shared_and_parallel_layers(tmp_path: Path) -> None:
    """A shared block on both stages and a parallel layer: 8 steps with pp=2 trace one process's loss curve, and the
    sharded checkpoint (the shared block held by both stages) resumes in one process."""
    common = [*TINY[:2], "--pattern", "A:z E [A M]|A:z E R", *TINY[4:], "--steps", "8", "--log-interval", "1",
              "--eval-interval", "4", "--out-dir", str(tmp_path), "--stp.start-step", "0", "--stp.ramp-steps", "0"]
    ok(single(*common, "--run-name", "one", "--batch-size", "2", "--grad-accum", "2", "--eval-batches", "4"))
    ok(torchrun("train.py", *common, "--run-name", "pp", "--batch-size", "4", "--parallel.pp", "2",
                "--parallel.microbatches", "2", "--eval-batches", "2"))
    assert_same_curve(curve(tmp_path / "pp"), curve(tmp_path / "one"), 1e-4, "pp=2 vs one process")
    ok(single("--resume", str(tmp_path / "pp"), "--steps", "10", "--no-progress", "--no-tensorboard", "--no-curves"))
    assert set(curve(tmp_path / "pp")) == set(range(1, 11))


def _continue(source: Path, into: Path, launch: list[str]) -> dict[int, float]:
    """Copy a 6-step run, drop its step-6 checkpoint, resume it from step 3 under ``launch``."""
    shutil.copytree(source, into)
    shutil.rmtree(into / "step_000006")
    shutil.rmtree(into / "best")
    ok(launch[0] == "torchrun" and torchrun("train.py", "--resume", str(into), "--steps", "6", "--no-progress",
                                            *launch[1:]) or single("--resume", str(into), "--steps", "6",
                                                                   "--no-progress"))
    return curve(into)


def test_checkpoints_resume_under_any_layout(tmp_path: Path) -> None:
    """A dp=2 run (DDP) and a pp=2 run each checkpoint at step 3; each resumes in one process and in the other
    layout and continues its loss curve (and the step-6 validation loss) where it left off."""
    common = [*TINY, "--steps", "6", "--log-interval", "1", "--eval-interval", "3", "--out-dir", str(tmp_path),
              "--stp.start-step", "2", "--batch-size", "4"]
    ok(torchrun("train.py", *common, "--run-name", "dp", "--parallel.dp", "2", "--parallel.data", "ddp"))
    ok(torchrun("train.py", *common, "--run-name", "pp", "--parallel.pp", "2"))
    for src, other in (("dp", ["torchrun", "--parallel.pp", "2"]), ("pp", ["torchrun", "--parallel.dp", "2"])):
        want = curve(tmp_path / src)
        for name, launch in ((f"{src}-in-one", ["single"]), (f"{src}-in-other", other)):
            got = _continue(tmp_path / src, tmp_path / name, launch)
            assert_same_curve({s: v for s, v in got.items() if s > 3}, {s: v for s, v in want.items() if s > 3},
                              1e-3, f"{name}: steps 4-6")
            assert_same_curve(curve(tmp_path / name, "val/loss"), curve(tmp_path / src, "val/loss"), 1e-3,
                              f"{name}: validation")


@pytest.mark.parametrize("data", ["fsdp", "ddp"])
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path, data: str) -> None:
    """Preemption under torchrun: SIGTERM reaches rank 1 alone, after step 3. Both ranks stop after step 3 (they
    agree before every step) and write the step-3 checkpoint together, sharded (each rank its own shard file,
    FSDP2 shards or DDP replicas, committed by meta.json), and the run resumed under torchrun follows the
    uninterrupted run's loss curve and validation."""
    common = [*TINY, "--steps", "6", "--log-interval", "1", "--eval-interval", "6", "--out-dir", str(tmp_path),
              "--batch-size", "4", "--stp.start-step", "2"]
    layout = ["--parallel.dp", "2", "--parallel.data", data]
    ok(torchrun("train.py", *common, *layout, "--run-name", "full"))
    cut = tmp_path / "cut"
    proc = torchrun("train.py", *common, *layout, "--run-name", "cut",
                    env={"AMER_FAULT_AT": "step:3", "AMER_FAULT_SIGNAL": "SIGTERM", "AMER_FAULT_RANK": "1"})
    ours = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File") and str(ROOT / "amer") in ln]
    assert proc.returncode != 0 and ours == [], proc.stderr[-3000:]  # torchrun reports the exits; amer raised none
    assert proc.stderr.count("stopped by SIGTERM after step 3") == 2, proc.stderr[-3000:]  # one line per rank
    assert sorted(p.name for p in cut.glob("step_*")) == ["step_000003"] and not list(cut.glob(".*tmp-*"))
    written = {p.name for p in (cut / "step_000003").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"} <= written, written  # both ranks' shards
    assert "model.safetensors" not in written and not (cut / "best").exists()  # nothing gathered; no evaluation
    assert json.loads((cut / "step_000003" / "meta.json").read_text())["step"] == 3
    assert sorted(curve(cut)) == [1, 2, 3]
    ok(torchrun("train.py", "--resume", str(cut), "--no-progress", *layout))
    assert_same_curve(curve(cut), curve(tmp_path / "full"), 1e-5, "resumed after SIGTERM")
    assert_same_curve(curve(cut, "val/loss"), curve(tmp_path / "full", "val/loss"), 1e-5, "validation")


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2


@pytest.mark.parametrize("args,env,message", [
    (["--pattern", "AE|MR", "--parallel.pp", "3"], {}, "needs a pattern of 3 stages"),
    (["--pattern", "AEMR", "--parallel.pp", "2"], {}, "needs a pattern of 2 stages"),
    (["--parallel.dp", "2"], {}, "launch with torchrun --nproc-per-node 2"),
    (["--parallel.dp", "4", "--batch-size", "8"], {"WORLD_SIZE": "2", "RANK": "0"}, "torchrun started 2 processes"),
    (["--parallel.dp", "3", "--batch-size", "4"], {}, "must be divisible by --parallel.dp 3"),
    (["--pattern", "AE|MR", "--parallel.pp", "2", "--parallel.microbatches", "1"], {}, "1f1b needs at least"),
    (["--pattern", "AE|MR", "--parallel.pp", "2", "--parallel.microbatches", "3"], {}, "must divide"),
    (["--parallel.data", "zero"], {}, "invalid choice"),
])
def test_bad_layouts_are_one_line_errors(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    proc = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--out-dir", str(tmp_path), *args],
                          cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len([ln for ln in lines if ln.strip() and not ln.startswith(("usage:", " "))]) == 1, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was created
