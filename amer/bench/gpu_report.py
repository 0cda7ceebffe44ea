"""The Python side of ``scripts/gpu_check.sh``: the machine's facts, causal-conv1d's build restricted to one GPU
architecture, and the one report (``report.md`` + ``report.json``) of a check.

``python -m amer.bench.gpu_report env --out DIR``             writes DIR/env.json
``python -m amer.bench.gpu_report arch-patch SETUP_PY ARCH``  keeps only ``sm_ARCH`` in causal-conv1d's setup.py
``python -m amer.bench.gpu_report write --out DIR``           writes DIR/report.md and DIR/report.json

The report reads what the steps left in DIR (``steps.jsonl``: one JSON object per step, ``name``, ``status`` (ok,
failed or skipped), ``seconds``, ``message``; ``env.json``, ``pytest.xml``, ``pytest.log``,
``bench.json``) and says plainly what was measured: a step that did not run, or a bench without CUDA, leaves
its section marked "not measured" rather than empty.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from amer.errors import ConfigError
from amer.fileread import json_loads, read_file
from amer.report import atomic_write_text, md_table, write_json

__all__ = ["environment", "restrict_arch", "collect", "format_markdown", "write_report", "main"]

def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[-1] if text else None


def environment() -> dict[str, Any]:
    """Python, torch, CUDA, Triton, nvcc, the GPU and which kernel packages import."""
    import torch

    from amer.ops import kernels

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nvcc": _version(["nvcc", "--version"])}
    for dist in ("triton", "mamba-ssm", "causal-conv1d", "megablocks"):  # installed versions, nothing imported
        try:
            env[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist.replace("-", "_")] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    env["kernel_packages"] = kernels.available()
    return env


_ARCH = re.compile(r'^(\s*)cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)\s*$')
_GENCODE = re.compile(r'^(\s*)cc_flag\.append\("-gencode"\)\s*$')


def restrict_arch(setup_py: str, arch: str) -> str:
    """causal-conv1d's setup.py with every ``-gencode`` pair but ``sm_<arch>`` turned into ``pass`` (it compiles
    nine architectures otherwise, minutes each; ``pass`` keeps the ``if`` blocks around them valid). Raises
    ConfigError when the file does not list that architecture or does not parse afterwards."""
    lines = setup_py.splitlines(keepends=True)
    archs = [m.group(2) for line in lines if (m := _ARCH.match(line))]
    if arch not in archs:
        raise ConfigError(f"setup.py lists no compute_{arch} gencode; listed: {sorted(set(archs))}")
    out = []
    for i, line in enumerate(lines):
        m = _ARCH.match(line)
        g = _GENCODE.match(line)
        nxt = _ARCH.match(lines[i + 1]) if i + 1 < len(lines) else None
        if (m and m.group(2) != arch) or (g and nxt and nxt.group(2) != arch):
            out.append(f"{(m or g).group(1)}pass\n")
        else:
            out.append(line)
    text = "".join(out)
    try:
        compile(text, "setup.py", "exec")
    except SyntaxError as e:
        raise ConfigError(f"setup.py does not parse after keeping only sm_{arch}: {e}") from None
    return text


def _junit(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable {path.name}: {e}"}
    cases, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (el.get("message") or "").splitlines()[0][:300] if el.get("message") else ""
                break
        counts[outcome] += 1
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "message": message})
    return {**counts, "cases": cases}


def collect(out: Path) -> dict[str, Any]:
    """Everything the steps left in ``out``, as one dict (the JSON report)."""
    steps = []
    if (out / "steps.jsonl").exists():
        steps = [json_loads(line) for line in read_file(out / "steps.jsonl").decode().splitlines() if line.strip()]
    env = json_loads(read_file(out / "env.json")) if (out / "env.json").exists() else {}
    log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else ""
    bench = json_loads(read_file(out / "bench.json")) if (out / "bench.json").exists() else None
    gpu_rows = (bench or {}).get("suites", {}).get("gpu", {}).get("rows", [])
    tests = _junit(out / "pytest.xml")
    return {"environment": env, "steps": steps, "tests": tests,
            "parity": [line.strip() for line in log.splitlines() if line.strip().startswith("parity ")],
            "bench": bench, "measured": {"parity": bool(tests and tests.get("passed")), "speed": bool(gpu_rows)}}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def format_markdown(report: dict[str, Any]) -> str:
    env, steps, tests = report["environment"], report["steps"], report["tests"]
    lines = ["# amer GPU check", ""]
    lines.append(f"- machine: {env.get('gpu') or 'no CUDA device'} (capability {env.get('capability', '-')}), "
                 f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 f"Triton {env.get('triton')}, nvcc: {env.get('nvcc') or 'not found'}; {env.get('date', '')}")
    lines.append(f"- installed: mamba-ssm {env.get('mamba_ssm')}, causal-conv1d {env.get('causal_conv1d')}, "
                 f"megablocks {env.get('megablocks')}")
    pk = env.get("kernel_packages") or {}
    lines.append("- kernel packages importable: " + (", ".join(f"{k} {'yes' if v else 'no'}" for k, v in pk.items())
                                                   or "unknown"))
    measured = report["measured"]
    said = {True: "yes", False: "NO"}
    lines.append(f"- measured: parity {said[measured['parity']]}, speed {said[measured['speed']]}")
    lines += ["", "## Steps", ""]
    lines.append(md_table(["step", "status", "seconds", "note"],
                          [[s["name"], s["status"], _cell(s["seconds"]), s["message"] or ""] for s in steps])
                 if steps else "no step ran")
    lines += ["", "## Parity tests (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("not measured: the tests did not run")
    elif "error" in tests:
        lines.append(tests["error"])
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
        odd = [c for c in tests["cases"] if c["outcome"] != "passed"]
        if odd:
            rows = [[c["name"], c["outcome"], c["message"]] for c in odd]
            lines += ["", md_table(["test", "outcome", "message"], rows)]
        if report["parity"]:
            lines += ["", "Relative errors `||kernel - reference|| / ||reference||` printed by the tests:", "", "```"]
            lines += report["parity"] + ["```"]
    lines += ["", "## Speed (`amer bench gpu --quick`)", ""]
    gpu = ((report["bench"] or {}).get("suites", {}).get("gpu")) or {}
    rows = gpu.get("rows", [])
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines.append(md_table(cols, [[_cell(r.get(c, "")) for c in cols] for r in rows]))
    else:
        lines.append("not measured: " + ("; ".join(gpu.get("notes", [])) or "the benchmark did not run"))
    for note in gpu.get("notes", []) if rows else []:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict[str, Path]:
    report = collect(out)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    write_json(paths["json"], report)
    atomic_write_text(paths["md"], format_markdown(report))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m amer.bench.gpu_report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("env", "write"):
        sub.add_parser(name).add_argument("--out", required=True, type=Path)
    ap = sub.add_parser("arch-patch")
    ap.add_argument("setup_py", type=Path)
    ap.add_argument("arch")
    args = p.parse_args(argv)
    try:
        if args.cmd == "env":
            write_json(args.out / "env.json", environment())
        elif args.cmd == "arch-patch":
            atomic_write_text(args.setup_py, restrict_arch(args.setup_py.read_text(), args.arch))
        else:
            paths = write_report(args.out)
            print(paths["md"].read_text())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
