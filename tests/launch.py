"""Launching ``train.py`` and torchrun from the multi-process tests as a user does: from the repository root, one
thread per process (the ranks share the machine's cores), and the per-step log read back as curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(n: int, *args: str, extra: dict[str, str] | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """``n`` processes of ``args`` on this host; ``extra`` adds environment variables."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra or {})), capture_output=True, text=True, timeout=timeout)


def single(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def curve(run_dir: Path, key: str = "ce") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if key in r}
