"""Preemption and sharing: a signal (SIGTERM from a scheduler, SIGHUP, Ctrl-C) checkpoints the step in progress so
that resuming loses no step, and one amer train at a time owns a run directory.

``AMER_FAULT_AT=step:N`` with ``AMER_FAULT_SIGNAL=SIGTERM`` makes a run signal itself right after step N (the
handler only records it, as a signal arriving mid-step would be), so the tests know where it stopped. In-process
runs send the signal to the test process itself, with ``amer train``'s handlers installed; the subprocess runs are
real processes, as a scheduler and a second user would meet them. The two-rank torchrun case is in
``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import amer.cli.train as train_cli
import amer.training.run as run_mod
import amer.training.stopping as stopping
from amer.checkpoint import list_checkpoints, read_checkpoint
from amer.training.runlock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--preset", "tiny", "--no-progress", "--no-tensorboard", "--no-curves", "--batch-size", "2", "--seq-len", "32",
        "--eval-batches", "1", "--steps", "12", "--log-interval", "1", "--eval-interval", "5",
        "--stp.start-step", "3", "--stp.ramp-steps", "2", "--warmup-steps", "2")


def train(out: Path, name: str, *extra: str) -> int:
    return train_cli.main([*ARGS, "--out-dir", str(out), "--run-name", name, *extra])


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "ce" in r]


def assert_same_as(reference: Path, run_dir: Path) -> None:
    keys = ["step", "loss", "ce", "stp", "stp/coeff", "grad_norm"]
    lines = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "ce" in r]
    want = [r for r in map(json.loads, (reference / "log.jsonl").read_text().splitlines()) if "ce" in r]
    assert [{k: r[k] for k in keys} for r in lines] == [{k: r[k] for k in keys} for r in want]
    (w_a, o_a, m_a), (w_b, o_b, m_b) = read_checkpoint(reference), read_checkpoint(run_dir)
    assert m_a["step"] == m_b["step"] == 12
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a) and all(torch.equal(o_a[k], o_b[k]) for k in o_a)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name
                  or p.name == LOCK_NAME)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert train(out, "full") == 0
    return out / "full"


def signal_after(monkeypatch: pytest.MonkeyPatch, step: int, sig: str) -> None:
    monkeypatch.setenv("AMER_FAULT_AT", f"step:{step}")
    monkeypatch.setenv("AMER_FAULT_SIGNAL", sig)


# ---------------------------------------------------------------- a signal checkpoints the step in progress


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_checkpoints_the_step_in_progress_and_resuming_loses_nothing(
        tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        sig: str, code: int) -> None:
    before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    signal_after(monkeypatch, 7, sig)
    assert train(tmp_path, "r") == code
    err = capsys.readouterr().err
    assert f"stopped by {sig} after step 7" in err and "--resume" in err
    run = tmp_path / "r"
    assert [p.name for p in list_checkpoints(run)] == ["step_000005", "step_000007"] and leftovers(run) == []
    assert steps_logged(run) == list(range(1, 8))
    assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == before, "the handlers are put back"
    monkeypatch.delenv("AMER_FAULT_AT")
    assert train_cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert_same_as(uninterrupted, run)


def test_sigterm_from_outside_ends_a_real_process_with_143_and_a_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AMER_FAULT_AT": "step:4",
           "AMER_FAULT_SIGNAL": "SIGTERM"}
    proc = subprocess.run([sys.executable, "-m", "amer.cli", "train", *ARGS, "--out-dir", str(tmp_path), "--run-name",
                           "r"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "stopped by SIGTERM after step 4" in proc.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_000004"] and leftovers(tmp_path / "r") == []


def test_a_signal_before_the_first_step_keeps_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    real = run_mod.open_run

    def signalled(*a, **kw):  # the signal lands while the run is being set up
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(run_mod, "open_run", signalled)
    assert train(tmp_path, "r") == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before the first step" in err
    assert list_checkpoints(tmp_path / "r") == [] and leftovers(tmp_path / "r") == []


def _slow_checkpoint(monkeypatch: pytest.MonkeyPatch, before_write) -> None:
    real = run_mod.save_checkpoint

    def save(path, *a, **kw):
        if Path(path).name == "step_000003":
            before_write()
        return real(path, *a, **kw)

    monkeypatch.setattr(run_mod, "save_checkpoint", save)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    signal_after(monkeypatch, 3, "SIGTERM")
    monkeypatch.setattr(stopping, "REPEAT_S", 0.0)  # the second one counts however soon it comes
    _slow_checkpoint(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert train(tmp_path, "r", "--eval-interval", "2") == 143
    err = capsys.readouterr().err
    assert "interrupted: the last written checkpoint is intact" in err
    run = tmp_path / "r"
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"] and leftovers(run) == []
    read_checkpoint(run / "step_000002")


def test_a_signal_delivered_twice_at_once_is_one_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun forwards the SIGTERM it got to workers that ``scancel`` (or the terminal) signalled already."""
    signal_after(monkeypatch, 3, "SIGTERM")
    _slow_checkpoint(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert train(tmp_path, "r", "--eval-interval", "2") == 143
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_000002", "step_000003"]


def test_the_stop_budget_bounds_the_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    signal_after(monkeypatch, 3, "SIGTERM")
    _slow_checkpoint(monkeypatch, lambda: time.sleep(30))  # a write that would outlast the scheduler's patience
    t0 = time.monotonic()
    assert train(tmp_path, "r", "--eval-interval", "2", "--stop-budget", "0.5") == 143
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 20 and "stop budget is spent" in err
    run = tmp_path / "r"
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"] and leftovers(run) == []


# ---------------------------------------------------------------- one amer train per run directory


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            done = steps_logged(run_dir)
        except (OSError, ValueError):
            done = []
        if len(done) >= at_least:
            return done[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {at_least} steps logged in {timeout} s")


def _start(tmp_path: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "amer.cli", "train", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_one_trainer_per_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second amer train (new, --resume or --overwrite) on a run another process is training is refused in one
    line naming that process; SIGTERM stops the first with a checkpoint of its last step, and after a holder
    dies by kill -9 its lock is no obstacle."""
    run = tmp_path / "r"
    long = (*ARGS, "--steps", "100000", "--eval-interval", "100000", "--stp.start-step", "100000")
    first = _start(tmp_path, *long, "--out-dir", str(tmp_path), "--run-name", "r")
    try:
        _wait_for_steps(run, first, 2)
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
        for argv in ([*long, "--out-dir", str(tmp_path), "--run-name", "r"],
                     [*long, "--out-dir", str(tmp_path), "--run-name", "r", "--overwrite"],
                     ["--resume", str(run), "--no-progress"]):
            capsys.readouterr()
            assert train_cli.main(argv) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"is in use by process {first.pid}" in lines[0], lines
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, err[-3000:]
    done = steps_logged(run)
    assert done == list(range(1, done[-1] + 1)) and [p.name for p in list_checkpoints(run)] == \
           [f"step_{done[-1]:06d}"] and leftovers(run) == []
    # a holder killed with SIGKILL leaves its lock file behind, and it stops no one
    second = _start(tmp_path, "--resume", str(run), "--no-progress")
    try:
        _wait_for_steps(run, second, len(done) + 1)
    finally:
        second.kill()
        second.communicate(timeout=60)
    assert (run / LOCK_NAME).exists()
    stop = steps_logged(run)[-1] + 2
    assert train_cli.main(["--resume", str(run), "--no-progress", "--stop-at", str(stop)]) == 0
    assert steps_logged(run) == list(range(1, stop + 1)), "every step once: none lost, none twice"
    assert not (run / LOCK_NAME).exists()
