"""The README's tour, run exactly as written: the commands between the ``tour`` markers, in a fresh directory,
through a shell, with the installed ``amer`` console script. A README command that stops working fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- tour:begin -->\s*```bash\n(.*?)```\s*<!-- tour:end -->", text, re.S)
    assert block, "README.md has no tour between the tour markers"
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    commands = tour_commands()
    assert len(commands) >= 6
    # the console scripts of this interpreter's environment, first on PATH, as after `pip install`
    bindir = str(Path(sys.executable).parent)
    assert shutil.which("amer", path=bindir), "the amer console script is not installed next to this python"
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    outputs = []
    for cmd in commands:
        res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd!r} exited {res.returncode}:\n{res.stderr[-2000:]}"
        outputs.append(res.stdout)
    for run in ("stp-on", "stp-off"):
        assert (tmp_path / "checkpoints" / run / "curves.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "stp-on" / "curvature" / "curvature.json").is_file()
    assert (tmp_path / "stp-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [out for cmd, out in zip(commands, outputs) if cmd.startswith("amer sample")]
    assert len(samples) == 2 and all(s.startswith("And God said") and len(s) > len("And God said") + 20
                                     for s in samples)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "exported" / "stp-on").iterdir()}
    assert outputs[-1].strip() == "AEMR"
