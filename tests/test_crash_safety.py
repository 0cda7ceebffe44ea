"""A resume killed at its most fragile moments loses nothing.

The resumed process is a real ``amer train`` subprocess; ``AMER_FAULT_AT=<point>`` makes it SIGKILL itself at
that point of a write (amer.fileio.fault_point), exactly where a power cut or ``kill -9`` could land: after a
new file is complete but before it replaces the old one, between the two halves of the ``best/`` swap, in the
middle of pruning. After each kill the run directory holds only complete files, and resuming once more gives
the log and the weights of a run that was never interrupted, with the files a user added still in place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amer.cli.train as train_cli
from amer.checkpoint import list_checkpoints, read_checkpoint

ARGS = ("--preset", "tiny", "--no-progress", "--no-tensorboard", "--no-curves", "--batch-size", "2", "--seq-len", "32",
        "--eval-batches", "1", "--steps", "12", "--log-interval", "1", "--eval-interval", "5", "--keep-last", "2",
        "--stp.start-step", "3", "--stp.ramp-steps", "2", "--warmup-steps", "2")


def train(out: Path, name: str, *extra: str) -> Path:
    assert train_cli.main([*ARGS, "--out-dir", str(out), "--run-name", name, *extra]) == 0
    return out / name


def killed_resume(run_dir: Path, point: str) -> subprocess.CompletedProcess:
    """``amer train --resume run_dir`` in a subprocess that kills itself at ``point``."""
    env = {**os.environ, "AMER_FAULT_AT": point, "OMP_NUM_THREADS": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from amer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "train", "--resume", str(run_dir), "--no-progress"],
                          env=env, capture_output=True, text=True, check=False, timeout=300)


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()[1:]) if "ce" in r]


def assert_same_as(uninterrupted: Path, run_dir: Path) -> None:
    keys = ["step", "loss", "ce", "stp", "stp/coeff", "grad_norm"]
    assert [{k: r[k] for k in keys} for r in train_lines(run_dir)] == \
           [{k: r[k] for k in keys} for r in train_lines(uninterrupted)]
    (w_a, o_a, m_a), (w_b, o_b, m_b) = read_checkpoint(uninterrupted), read_checkpoint(run_dir)
    assert m_a["step"] == m_b["step"] == 12
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a) and all(torch.equal(o_a[k], o_b[k]) for k in o_a)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    r = train(out, "full")
    _note_first(r)  # the first line of every log here is a user's note (train_lines skips it)
    return r


def interrupted(tmp_path: Path) -> Path:
    """A run stopped at step 7 whose step-7 checkpoint was lost: resuming it redoes steps 6 and 7, so the log
    must be rewritten (their lines dropped) before the run goes on."""
    r = train(tmp_path, "r", "--stop-at", "7")
    for f in ("model.safetensors", "optim.safetensors", "meta.json", "tokenizer.json"):
        (r / "step_000007" / f).unlink()
    (r / "step_000007").rmdir()
    (r / "notes.txt").write_text("mine")
    return r


def _note_first(run_dir: Path) -> None:
    log = run_dir / "log.jsonl"
    log.write_text("# my note about this run\n" + log.read_text())


def test_kill_during_the_log_rewrite_keeps_the_whole_log(tmp_path: Path, uninterrupted: Path) -> None:
    r = interrupted(tmp_path)
    _note_first(r)
    before = (r / "log.jsonl").read_bytes()
    assert b'"step": 7' in before
    proc = killed_resume(r, "replace:log.jsonl")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (r / "log.jsonl").read_bytes() == before, "the old log is whole until the new one replaces it"
    assert any(p.name.startswith(".log.jsonl.tmp-") for p in r.iterdir()), "the kill came mid-rewrite"
    assert train_cli.main(["--resume", str(r), "--no-progress"]) == 0
    assert (r / "log.jsonl").read_text().startswith("# my note about this run\n")
    assert_same_as(uninterrupted, r)
    assert leftovers(r) == [] and (r / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("point", ["replace:config.json", "checkpoint:step_000010", "swap:best", "prune"])
def test_kill_during_resume_loses_nothing(tmp_path: Path, uninterrupted: Path, point: str) -> None:
    r = interrupted(tmp_path)
    _note_first(r)
    proc = killed_resume(r, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    for ck in [*list_checkpoints(r), r / "best"]:  # whatever exists under a real name is complete
        if ck.exists():
            read_checkpoint(ck)
    json.loads((r / "config.json").read_text())
    assert train_cli.main(["--resume", str(r), "--no-progress"]) == 0
    assert_same_as(uninterrupted, r)
    assert leftovers(r) == [] and (r / "notes.txt").read_text() == "mine"
    assert read_checkpoint(r / "best")[2]["step"] in (5, 10, 12)
