"""mamba-ssm's Triton kernels (under the interpreter, fp32) against amer's pure-torch SSD references.

The chunked scan (``mamba_chunk_scan_combined`` through amer's custom ops), forward and backward: packed
documents (``seq_idx``) with an initial state and a length that is not a multiple of the chunk, and plain
rows; the decoding step (``selective_state_update``); the gated RMSNorm (``layernorm_gated.rmsnorm_fn``).
Each comparison has a negative control that the same check rejects. Tolerances (fp32, absolute and relative
together, ``torch.testing.assert_close``): outputs 1e-4, gradients 5e-4 (the kernels sum chunk contributions
in another order; the gradient of ``dt`` gathers products over whole chunks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amer.ops import kernels
from amer.ops.fused import rms_norm
from amer.ops.ssd import ssd_chunked, ssd_scan_torch, ssd_step, ssd_step_torch
from amer.ops.ssd_kernels import gated_rmsnorm_kernel

OUT_TOL = dict(rtol=1e-4, atol=1e-4)
GRAD_TOL = dict(rtol=5e-4, atol=5e-4)
b, T, H, P, G, N, CHUNK = 2, 24, 4, 8, 2, 8, 16  # T = 24: a full chunk and a remainder of 8
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def max_err(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.detach() - r.detach()).abs().max())


def inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = F.softplus(torch.randn(b, T, H, generator=g) - 1.0)
    A = -torch.rand(H, generator=g) * 4 - 0.1
    B_ = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    s0 = torch.randn(b, H, P, N, generator=g)
    return [x, dt, A, B_, C, s0]


# row 0: three documents, the second crossing the chunk boundary; row 1: one document (amer's 1-based numbers)
SEQ_IDX = torch.tensor([[1] * 10 + [2] * 9 + [3] * 5, [1] * T])


def run(path: str, documents: bool, with_init: bool):
    """y, final state and the gradients of a fixed random projection of both, on ``path``."""
    ins = [t.clone().requires_grad_() for t in inputs()]
    init = ins[5] if with_init else None
    seq = SEQ_IDX if documents else None
    if path == "kernel":
        y, fs = ssd_chunked(*ins[:5], CHUNK, init, seq)
    else:
        y, fs = ssd_scan_torch(*ins[:5], CHUNK, init, seq)
    g = torch.Generator().manual_seed(5)
    wy, wf = torch.randn(y.shape, generator=g), torch.randn(fs.shape, generator=g)
    grads = torch.autograd.grad((y * wy).sum() + (fs * wf).sum(), ins if with_init else ins[:5])
    return y.detach(), fs.detach(), grads


@pytest.fixture(scope="module")
def documents_case():
    """Packed documents + initial state + chunk remainder, through the kernel and the reference."""
    kernel = run("kernel", documents=True, with_init=True)
    assert kernels.choices()["ssd_scan"].startswith("mamba_ssm.mamba_chunk_scan_combined")
    return kernel, run("reference", documents=True, with_init=True)


def test_scan_with_documents_and_initial_state_matches_reference(documents_case) -> None:
    (y, fs, grads), (y_r, fs_r, grads_r) = documents_case
    print(f"\nparity ssd_scan documents+init: y {max_err(y, y_r):.2e}, final state {max_err(fs, fs_r):.2e}, "
          + ", ".join(f"d{n} {max_err(a, r):.2e}" for n, a, r in zip(NAMES, grads, grads_r)))
    torch.testing.assert_close(y, y_r, **OUT_TOL)
    torch.testing.assert_close(fs, fs_r, **OUT_TOL)
    for name, a, r in zip(NAMES, grads, grads_r):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, r, **GRAD_TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_scan_negative_controls_documents_and_initial_state_matter(documents_case) -> None:
    """The same comparison fails against the reference without documents, and without the initial state."""
    (y, fs, _), _ = documents_case
    y_nodoc, _, _ = run("reference", documents=False, with_init=True)
    y_noinit, _, _ = run("reference", documents=True, with_init=False)
    for other in (y_nodoc, y_noinit):
        assert max_err(y, other) > 100 * OUT_TOL["atol"]
        with pytest.raises(AssertionError):
            torch.testing.assert_close(y, other, **OUT_TOL)


def test_scan_without_documents_matches_reference() -> None:
    y, fs, grads = run("kernel", documents=False, with_init=False)
    y_r, fs_r, grads_r = run("reference", documents=False, with_init=False)
    print(f"\nparity ssd_scan plain: y {max_err(y, y_r):.2e}, final state {max_err(fs, fs_r):.2e}, "
          + ", ".join(f"d{n} {max_err(a, r):.2e}" for n, a, r in zip(NAMES, grads, grads_r)))
    torch.testing.assert_close(y, y_r, **OUT_TOL)
    torch.testing.assert_close(fs, fs_r, **OUT_TOL)
    for name, a, r in zip(NAMES, grads, grads_r):
        torch.testing.assert_close(a, r, **GRAD_TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_decode_step_matches_reference_and_keeps_the_cache_unchanged() -> None:
    x, dt, A, B_, C, s0 = inputs(1)
    state = s0.clone()
    y, new = ssd_step(x[:, 0], dt[:, 0], A, B_[:, 0], C[:, 0], state)
    assert kernels.choices()["ssd_update"].startswith("mamba_ssm.selective_state_update")
    y_r, new_r = ssd_step_torch(x[:, 0], dt[:, 0], A, B_[:, 0], C[:, 0], s0)
    print(f"\nparity ssd_update: y {max_err(y, y_r):.2e}, state {max_err(new, new_r):.2e}")
    torch.testing.assert_close(y, y_r, **OUT_TOL)
    torch.testing.assert_close(new, new_r, **OUT_TOL)
    assert torch.equal(state, s0)  # the kernel updates its own copy: caches stay values
    # negative control: a step from a forgotten (zero) state is caught by the same check
    y_zero, _ = ssd_step_torch(x[:, 0], dt[:, 0], A, B_[:, 0], C[:, 0], torch.zeros_like(s0))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, y_zero, **OUT_TOL)


@pytest.mark.parametrize("groups", [1, 2])
def test_gated_rmsnorm_matches_reference(groups: int) -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 7, 32, generator=g, requires_grad=True)
    z = torch.randn(2, 7, 32, generator=g, requires_grad=True)
    w = (torch.rand(32, generator=g) + 0.5).requires_grad_()
    fn = kernels.gated_rmsnorm(y.device, y.dtype)
    assert fn is not None
    out = gated_rmsnorm_kernel(fn, y, z, w, 1e-5, groups)
    ref = rms_norm(y.unflatten(-1, (groups, -1)), w.view(groups, -1), 1e-5, gate=z.unflatten(-1, (groups, -1)))
    ref = ref.flatten(-2)
    gw = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * gw).sum(), [y, z, w])
    grads_r = torch.autograd.grad((ref * gw).sum(), [y, z, w])
    print(f"\nparity gated_rmsnorm groups={groups}: out {max_err(out, ref):.2e}, "
          + ", ".join(f"d{n} {max_err(a, r):.2e}" for n, a, r in zip("yzw", grads, grads_r)))
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, **GRAD_TOL)
    # negative control: the norm of the gated product per group is not the norm over the other grouping
    other = rms_norm(y.unflatten(-1, (3 - groups, -1)), w.view(3 - groups, -1), 1e-5,
                     gate=z.unflatten(-1, (3 - groups, -1))).flatten(-2)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, other, **OUT_TOL)


def test_the_switch_forces_the_reference_under_the_interpreter() -> None:
    x, dt, A, B_, C, _ = inputs()
    with kernels.use("reference"):
        assert kernels.ssd_scan(x.device, x.dtype) is None
        assert kernels.choices()["ssd_scan"] == "reference (forced by kernels.use('reference'))"
    assert kernels.ssd_scan(x.device, torch.bfloat16) is None  # bf16 is wrong in the interpreter
    assert "fp32 only" in kernels.choices()["ssd_scan"]
    assert kernels.ssd_scan(x.device, x.dtype) is not None
