"""``scripts/gpu_check.sh`` and ``amer bench gpu`` where no GPU is: argument errors, the skip messages, the
report written from what the steps leave behind, and causal-conv1d's build restricted to one architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amer.bench import BenchOptions, run_suite
from amer.bench.gpu import peak_bf16
from amer.bench.gpu_report import collect, format_markdown, restrict_arch, write_report
from amer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown option '--bogus' (accepted: --out, --wheelhouse, --budget, --no-install)"),
    (["--budget", "ten"], "--budget needs a whole number of seconds, got 'ten'"),
    (["--out"], "--out needs a directory"),
])
def test_bad_arguments_are_one_line_errors(args, message) -> None:
    out = run_script(*args)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.slow  # ~10 s alone, more on a busy machine: the script starts Python a few times
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script installs, builds and benchmarks")
def test_without_cuda_every_gpu_step_is_skipped_and_the_report_says_so(tmp_path) -> None:
    out = run_script("--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    names = ["install-mamba-ssm", "build-causal-conv1d", "pytest-gpu", "bench-gpu"]
    assert [s["name"] for s in report["steps"]] == names
    assert {s["status"] for s in report["steps"]} == {"skipped"}
    assert all("no CUDA device" in s["message"] for s in report["steps"])
    assert report["measured"] == {"parity": False, "speed": False}
    md = (tmp_path / "r" / "report.md").read_text()
    assert "measured: parity NO, speed NO" in md and "not measured: the tests did not run" in md
    assert md in out.stdout  # the report is printed at the end


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_ssd_scan[fp32]" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_ssd_scan[bf16]" time="1.0">
<failure message="ssd_scan: relative errors [0.04] above 0.03">trace</failure></testcase>
<testcase classname="tests.test_gpu" name="test_causal_conv1d[fp32]" time="0.0">
<skipped message="causal_conv1d does not import here"/></testcase>
</testsuite></testsuites>"""


def fill(out: Path, *, bench: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.jsonl").write_text(
        json.dumps({"name": "install-mamba-ssm", "status": "ok", "seconds": 21.0, "message": "log: x.log"}) + "\n"
        + json.dumps({"name": "build-causal-conv1d", "status": "failed", "seconds": 330.0,
                      "message": "stopped after 330 s"}) + "\n")
    (out / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "python": "3.12.3",
                                              "torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0",
                                              "kernel_packages": {"mamba_ssm": True, "causal_conv1d": False}}))
    (out / "pytest.xml").write_text(JUNIT)
    (out / "pytest.log").write_text("collected 3 items\n\nparity ssd_scan torch.float32 outputs: 1.2e-03\n.\n")
    if bench:
        rows = [{"name": "small kernels", "tokens_per_s": 412000.0, "MFU": 0.21},
                {"name": "small reference", "tokens_per_s": 150000.0, "MFU": 0.08}]
        (out / "bench.json").write_text(json.dumps({"suites": {"gpu": {"rows": rows, "notes": ["H100: ..."]}}}))


def test_the_report_from_what_the_steps_left(tmp_path) -> None:
    fill(tmp_path, bench=True)
    paths = write_report(tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["tests"]["passed"] == 1 and report["tests"]["failed"] == 1 and report["tests"]["skipped"] == 1
    assert report["parity"] == ["parity ssd_scan torch.float32 outputs: 1.2e-03"]
    assert report["measured"] == {"parity": True, "speed": True}
    md = paths["md"].read_text()
    assert "NVIDIA H100 80GB HBM3 (capability 9.0)" in md and "| build-causal-conv1d | failed | 330 | stopped" in md
    assert "1 passed, 1 failed, 1 skipped" in md and "relative errors [0.04] above 0.03" in md
    assert "| small kernels | 412,000 | 0.21 |" in md
    # negative control: without the benchmark's output the speed section says it was not measured
    (tmp_path / "bench.json").unlink()
    md = format_markdown(collect(tmp_path))
    assert "measured: parity yes, speed NO" in md and "not measured: the benchmark did not run" in md


SETUP = '''
if not SKIP_CUDA_BUILD:
    cc_flag = []
    if HIP_BUILD:
        cc_flag.append("-DBUILD_PYTHON_PACKAGE")
    else:
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
'''


def test_causal_conv1d_builds_for_one_architecture() -> None:
    text = restrict_arch(SETUP, "90")
    assert "arch=compute_90,code=sm_90" in text and "compute_80" not in text and "compute_100" not in text
    assert text.count('cc_flag.append("-gencode")') == 1 and "-DBUILD_PYTHON_PACKAGE" in text
    scope: dict = {"SKIP_CUDA_BUILD": False, "HIP_BUILD": False, "bare_metal_version": 12.9, "Version": float}
    exec(text, scope)  # the emptied `if` blocks still parse and run (they hold `pass`)
    assert scope["cc_flag"] == ["-gencode", "arch=compute_90,code=sm_90"]
    with pytest.raises(ConfigError, match="lists no compute_89 gencode; listed: \\['100', '80', '90'\\]"):
        restrict_arch(SETUP, "89")


def test_bench_gpu_without_cuda_says_why_and_knows_the_peaks() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the suite would run")
    res = run_suite("gpu", BenchOptions(quick=True))
    assert not res.rows and res.notes == ["skipped: no CUDA device (torch.cuda.is_available() is False)"]
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_bf16("NVIDIA H100 PCIe") == 756.0e12
    assert peak_bf16("NVIDIA H200") == 989.4e12 and peak_bf16("Tesla T4") is None
