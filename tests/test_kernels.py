"""The kernel gateway (:mod:`amer.ops.kernels`): one switch, one log, the reasons a kernel is not used, the
mamba-ssm import without its package ``__init__``, and the grouped-GEMM MoE dispatch (the one kernel path that
runs on every CPU) against the reference dispatch. The Triton kernels themselves are tested in ``tests/kernels``
(the kernel lane) and on CUDA by the ``gpu`` tests."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amer.errors import ConfigError
from amer.ops import kernels
from amer.ops.moe import dispatch_dropless

CPU = torch.device("cpu")


def test_the_switch_env_and_context_manager(monkeypatch) -> None:
    monkeypatch.delenv("AMER_KERNELS", raising=False)
    assert kernels.mode() == "auto"
    monkeypatch.setenv("AMER_KERNELS", "reference")
    assert kernels.mode() == "reference"
    with kernels.use("auto"):  # the context manager wins over the environment
        assert kernels.mode() == "auto"
        with kernels.use("reference"):
            assert kernels.mode() == "reference"
        assert kernels.mode() == "auto"
    assert kernels.mode() == "reference"
    assert kernels.grouped_mm(CPU, torch.float32) is None
    assert kernels.choices()["moe_experts"] == "reference (forced by AMER_KERNELS=reference)"
    monkeypatch.setenv("AMER_KERNELS", "fast")
    with pytest.raises(ConfigError, match="AMER_KERNELS must be one of auto, reference, got 'fast'"):
        kernels.mode()
    with pytest.raises(ConfigError, match="kernels.use"):
        with kernels.use("triton"):
            pass


def test_each_choice_is_logged_once_per_reason(caplog, monkeypatch) -> None:
    monkeypatch.delenv("AMER_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="amer.ops.kernels"):
        for _ in range(3):
            kernels.grouped_mm(CPU, torch.float32)
        with kernels.use("reference"):
            kernels.grouped_mm(CPU, torch.float32)
            kernels.grouped_mm(CPU, torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.name == "amer.ops.kernels"]
    assert lines == ["kernels: moe_experts -> torch._grouped_mm",
                     "kernels: moe_experts -> reference (forced by kernels.use('reference'))"], lines


def test_reasons_when_a_kernel_does_not_apply(monkeypatch) -> None:
    monkeypatch.delenv("AMER_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.ssd_scan(CPU, torch.float32) is None
    assert kernels.choices()["ssd_scan"].startswith("reference (wrong device: cpu")
    assert kernels.conv1d(CPU, torch.float32, 4, 64) is None
    assert "causal-conv1d's kernels are CUDA-only" in kernels.choices()["conv1d"]
    assert kernels.grouped_mm(CPU, torch.float64) is None
    assert kernels.choices()["moe_experts"] == "reference (unsupported option: torch.float64)"
    assert kernels.grouped_mm(CPU, torch.bfloat16, (32, 36)) is None
    assert "not multiples of 8" in kernels.choices()["moe_experts"]
    assert kernels.megablocks(CPU) is None
    assert kernels.attention_backend(CPU, documents=True) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter computes bf16 wrongly: fp32 only
    assert kernels.gated_rmsnorm(CPU, torch.bfloat16) is None
    assert "fp32 only" in kernels.choices()["gated_rmsnorm"]


def test_mamba_ssm_triton_modules_import_without_the_package_init(tmp_path: Path) -> None:
    """An install without the CUDA extension: the package ``__init__`` fails on it, the Triton submodule does not
    need it. A stand-in package on the path shows the gateway imports the submodule anyway (in a subprocess, so
    this process's modules stay as they are)."""
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda\n")  # missing, as without the CUDA build
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text("def mamba_chunk_scan_combined():\n    return 'scan'\n")
    code = textwrap.dedent("""
        import importlib, sys
        try:
            importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
            print("plain import: ok")
        except ImportError as e:
            print("plain import:", e)
        from amer.ops import kernels
        mod = kernels.mamba_module("ops.triton.ssd_combined")
        print("gateway:", mod.mamba_chunk_scan_combined())
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "plain import: No module named 'selective_scan_cuda'" in out.stdout  # the control: it does fail
    assert "gateway: scan" in out.stdout


def routing(seed: int, N: int = 37, E: int = 4, k: int = 2, D: int = 16, F: int = 24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    scores = torch.rand(N, E, generator=g)
    scores[:, 1] = -1.0  # expert 1 receives no rows: its weight gradient must be exactly zero
    idx = scores.topk(k, dim=-1).indices
    w = torch.rand(N, k, generator=g, dtype=dtype)
    wgu = torch.randn(E, D, 2 * F, generator=g, dtype=dtype) * 0.2
    wd = torch.randn(E, F, D, generator=g, dtype=dtype) * 0.2
    return x, idx, w, wgu, wd


def dispatch_and_grads(x, idx, w, wgu, wd):
    leaves = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    y = dispatch_dropless(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    return y.detach(), torch.autograd.grad((y * g).sum(), leaves)


def test_grouped_gemm_dispatch_equals_the_reference_dispatch(monkeypatch) -> None:
    monkeypatch.delenv("AMER_KERNELS", raising=False)
    data = routing(0)
    y, grads = dispatch_and_grads(*data)
    assert kernels.choices()["moe_experts"] == "torch._grouped_mm"
    with kernels.use("reference"):
        y_r, grads_r = dispatch_and_grads(*data)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[2][1], torch.zeros_like(grads[2][1]))  # the expert without rows
    # negative control: another routing of the same tokens gives other outputs
    x, idx, w, wgu, wd = data
    y_other, _ = dispatch_and_grads(x, idx.roll(1, dims=0), w, wgu, wd)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y_other, y_r, rtol=1e-5, atol=1e-5)


def test_grouped_gemm_dispatch_in_bf16_and_autocast(monkeypatch) -> None:
    monkeypatch.delenv("AMER_KERNELS", raising=False)
    x, idx, w, wgu, wd = routing(1)
    with kernels.use("reference"):
        y32, _ = dispatch_and_grads(x, idx, w, wgu, wd)
    y16, _ = dispatch_and_grads(*(t.bfloat16() if t.is_floating_point() else t for t in (x, idx, w, wgu, wd)))
    assert kernels.choices()["moe_experts"] == "torch._grouped_mm" and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, _ = dispatch_and_grads(x, idx, w, wgu, wd)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), y32, rtol=0.05, atol=0.05)


def test_the_grouped_swiglu_custom_op_passes_torch_opcheck() -> None:
    """Schema, shape function, autograd registration and tracing of ``amer::grouped_swiglu_fwd`` (torch's own
    checker), with an empty group among the experts."""
    import amer.ops.grouped  # noqa: F401  (registers the op)

    g = torch.Generator().manual_seed(3)
    xs = torch.randn(24, 16, generator=g, requires_grad=True)
    wgu = torch.randn(3, 16, 48, generator=g, requires_grad=True)
    wd = torch.randn(3, 24, 16, generator=g, requires_grad=True)
    offs = torch.tensor([10, 10, 24], dtype=torch.int32)
    torch.library.opcheck(torch.ops.amer.grouped_swiglu_fwd, (xs, wgu, wd, offs))
    # without gradients the body runs without the op's dispatch: the same output, and the op is not called
    # (negative control: with gradients it is)
    from amer.ops import grouped

    calls = []
    real = grouped._fwd
    grouped._fwd = lambda *a: (calls.append(1), real(*a))[1]
    try:
        with torch.no_grad():
            plain = grouped.grouped_swiglu(xs, wgu, wd, offs)
        assert calls == []
        torch.testing.assert_close(plain, grouped.grouped_swiglu(xs, wgu, wd, offs).detach(), rtol=0, atol=0)
        assert calls == [1]
    finally:
        grouped._fwd = real
