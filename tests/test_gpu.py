"""Every fast path on CUDA against amer's pure-torch reference on the same device (``kernels.use("reference")``),
outputs and gradients, in fp32 and bf16. Marked ``gpu`` and skipped without CUDA; a kernel whose package does not
import is skipped with the import error (``scripts/gpu_check.sh`` installs them and runs ``pytest -m gpu``).

Errors are relative norms, ``||kernel - reference|| / ||reference||``, which stay meaningful for bf16 where
elementwise tolerances would be dominated by the few largest values. Tolerances per dtype: fp32 5e-3 (Triton's
fp32 ``tl.dot`` runs on TF32 tensor cores, about 1e-3 relative per product), bf16 3e-2 (inputs and the kernels'
intermediate states rounded to 8 mantissa bits, reference computed in fp32 from the same rounded inputs);
gradients twice that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amer import AttentionConfig, MambaConfig, ModelConfig
from amer.blocks.attention import AttentionMixer
from amer.blocks.doc_ids import DocIds
from amer.blocks.mamba import MambaMixer
from amer.ops import kernels
from amer.ops.conv import causal_conv1d
from amer.ops.moe import dispatch_dropless
from amer.ops.ssd import ssd_chunked, ssd_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the fast paths are CUDA "
                                 "kernels; their CPU checks are tests/kernels and tests/test_kernels.py)")]

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
CUDA = torch.device("cuda")


def need(package: str) -> None:
    if not kernels.available()[package]:
        errors = {k: v for k, v in kernels._import_errors.items() if package in k}
        pytest.skip(f"{package} does not import here: {errors or 'not installed'}")


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp(min=1e-30))


def check(name: str, got, want, tol: float) -> None:
    pairs = list(zip(got, want)) if isinstance(got, (list, tuple)) else [(got, want)]
    errs = [rel(a, r) for a, r in pairs]
    print(f"\nparity {name}: " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= tol, f"{name}: relative errors {errs} above {tol}"


def run_both(fn, leaves: list[torch.Tensor]):
    """``fn`` on the kernels and on the references: outputs and gradients of a fixed projection of them."""
    results = []
    for mode in ("auto", "reference"):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
        with kernels.use(mode):
            outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator(device="cuda").manual_seed(7)
        loss = sum((o.float() * torch.randn(o.shape, device=CUDA, generator=g)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
        results.append(([o.detach().float() for o in outs], [g_.float() for g_ in grads if g_ is not None]))
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_ssd_scan(dtype) -> None:
    need("mamba_ssm")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, T, H, P, G, N = 2, 200, 8, 64, 2, 64

    def r(*shape):
        return torch.randn(*shape, device=CUDA, generator=g)

    x, B_, C = r(b, T, H, P).to(dtype), r(b, T, G, N).to(dtype), r(b, T, G, N).to(dtype)
    dt = F.softplus(r(b, T, H) - 1.0)
    A = -torch.rand(H, device=CUDA, generator=g) * 4 - 0.1
    s0 = r(b, H, P, N)
    seq = torch.cat([torch.full((1, 70), 1), torch.full((1, 100), 2), torch.full((1, 30), 3)], 1).to(CUDA)
    seq = torch.cat([seq, torch.ones(1, T, dtype=torch.long, device=CUDA)])

    def scan(x, dt, A, B_, C, s0):
        if kernels.mode() == "reference":  # the reference in fp32 from the same rounded inputs
            x, B_, C = x.float(), B_.float(), C.float()
        return ssd_chunked(x, dt, A, B_, C, 64, s0, seq)

    (out, grads), (out_r, grads_r) = run_both(scan, [x, dt, A, B_, C, s0])
    check(f"ssd_scan {dtype} outputs", out, out_r, TOL[dtype])
    check(f"ssd_scan {dtype} gradients", grads, grads_r, 2 * TOL[dtype])
    # negative control: the scan without documents is far from the one with them
    with kernels.use("reference"):
        plain, _ = ssd_chunked(x.float(), dt, A, B_.float(), C.float(), 64, s0)
    assert rel(plain, out_r[0]) > 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_ssd_decoding_step(dtype) -> None:
    need("mamba_ssm")
    g = torch.Generator(device="cuda").manual_seed(1)
    b, H, P, G, N = 3, 8, 64, 2, 128
    x = torch.randn(b, H, P, device=CUDA, generator=g).to(dtype)
    dt = F.softplus(torch.randn(b, H, device=CUDA, generator=g))
    A = -torch.rand(H, device=CUDA, generator=g) - 0.1
    B_, C = (torch.randn(b, G, N, device=CUDA, generator=g).to(dtype) for _ in range(2))
    state = torch.randn(b, H, P, N, device=CUDA, generator=g)
    y, new = ssd_step(x, dt, A, B_, C, state)
    assert kernels.choices()["ssd_update"].startswith("mamba_ssm")
    with kernels.use("reference"):
        y_r, new_r = ssd_step(x.float(), dt, A, B_.float(), C.float(), state)
    check(f"ssd_update {dtype}", [y.float(), new], [y_r, new_r], TOL[dtype])


def make_mamba(dtype) -> MambaMixer:
    cfg = ModelConfig(pattern="M", d_model=256, mamba=MambaConfig(d_state=64, head_dim=64, n_groups=2, chunk_size=64))
    torch.manual_seed(0)
    mixer = MambaMixer(cfg.mamba, cfg.dims, cfg.parsed.layers[0]).to(CUDA)
    with torch.no_grad():
        for lin in (mixer.in_proj, mixer.out_proj):
            lin.weight.normal_(0, 0.05)
    return mixer


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_mamba_block_with_documents(dtype) -> None:
    """The M block end to end (causal-conv1d with seq_idx, the SSD kernels, the gated norm) vs the references."""
    need("mamba_ssm")
    mixer = make_mamba(dtype)
    x = torch.randn(2, 300, 256, device=CUDA, generator=torch.Generator(device="cuda").manual_seed(2))
    docs = DocIds(torch.cat([torch.full((1, 120), 0), torch.full((1, 180), 1)], 1).expand(2, -1).to(CUDA))
    params = list(mixer.parameters())

    def block(x, *ps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return mixer(x, documents=docs).y

    (out, grads), (out_r, grads_r) = run_both(block, [x, *params])
    print("\nM block backends:", kernels.choices())
    check(f"M block {dtype} output", out, out_r, TOL[dtype])
    check(f"M block {dtype} gradients", grads[:1], grads_r[:1], 2 * TOL[dtype])


def test_mamba_prefill_and_steps_equal_the_full_forward() -> None:
    need("mamba_ssm")
    mixer = make_mamba(torch.float32)
    x = torch.randn(2, 150, 256, device=CUDA, generator=torch.Generator(device="cuda").manual_seed(3))
    with torch.no_grad():
        full = mixer(x).y
        pre = mixer(x[:, :130], cache=mixer.init_cache(2, 150))
        cache, outs = pre.cache, [pre.y]
        for t in range(130, 150):
            out = mixer(x[:, t:t + 1], cache=cache)
            cache, outs = out.cache, outs + [out.y]
    check("M prefill + steps vs full", torch.cat(outs, 1), full, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_causal_conv1d(dtype) -> None:
    need("causal_conv1d")
    g = torch.Generator(device="cuda").manual_seed(4)
    B, T, C, K = 2, 100, 64, 4
    x = torch.randn(B, T, C, device=CUDA, generator=g).to(dtype)
    w, bias = torch.randn(C, K, device=CUDA, generator=g), torch.randn(C, device=CUDA, generator=g)
    docs = DocIds(torch.cat([torch.full((B, 37), 0), torch.full((B, 63), 1)], 1).to(CUDA))
    state = torch.randn(B, K - 1, C, device=CUDA, generator=g).to(dtype)

    def conv(x, w, bias):
        return causal_conv1d(x, w, bias, position=docs.position, seq_idx=docs.index)[0]

    (out, grads), (out_r, grads_r) = run_both(conv, [x, w, bias])
    assert kernels.choices()["conv1d"].startswith("reference (forced")
    check(f"conv1d documents {dtype}", out, out_r, TOL[dtype])
    check(f"conv1d documents {dtype} gradients", grads, grads_r, 2 * TOL[dtype])
    (out, _), (out_r, _) = run_both(lambda x: causal_conv1d(x, w, bias, state), [x])
    check(f"conv1d initial state {dtype}", out, out_r, TOL[dtype])
    y, new = causal_conv1d(x[:, :1], w, bias, state)
    with kernels.use("reference"):
        y_r, new_r = causal_conv1d(x[:, :1], w, bias, state)
    check(f"conv1d update {dtype}", [y.float(), new.float()], [y_r.float(), new_r.float()], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_grouped_gemm_experts(dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(5)
    N, E, k, D, F_ = 512, 8, 2, 256, 512
    x = torch.randn(N, D, device=CUDA, generator=g).to(dtype)
    idx = torch.rand(N, E, device=CUDA, generator=g).topk(k, -1).indices
    w = torch.rand(N, k, device=CUDA, generator=g).to(dtype)
    wgu = (torch.randn(E, D, 2 * F_, device=CUDA, generator=g) * 0.05).to(dtype)
    wd = (torch.randn(E, F_, D, device=CUDA, generator=g) * 0.05).to(dtype)
    (out, grads), (out_r, grads_r) = run_both(lambda x, w, a, b: dispatch_dropless(x, idx, w, a, b), [x, w, wgu, wd])
    check(f"grouped GEMM experts {dtype}", out, out_r, TOL[dtype])
    check(f"grouped GEMM experts {dtype} gradients", grads, grads_r, 2 * TOL[dtype])


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_flex_attention_documents(dtype, window) -> None:
    cfg = ModelConfig(pattern="A", d_model=256, max_seq_len=512,
                      attention=AttentionConfig(n_heads=8, n_kv_heads=2, window=window))
    torch.manual_seed(0)
    mixer = AttentionMixer(cfg.attention, cfg.dims, cfg.parsed.layers[0]).to(CUDA)
    x = torch.randn(2, 384, 256, device=CUDA, generator=torch.Generator(device="cuda").manual_seed(6))
    ids = torch.cat([torch.full((2, 100), 0), torch.full((2, 200), 1), torch.full((2, 84), 2)], 1).to(CUDA)

    def attend(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return mixer(x, documents=DocIds(ids)).y

    (out, grads), (out_r, grads_r) = run_both(attend, [x])
    assert kernels.choices()["attention_documents"].startswith("reference (forced")
    check(f"flex attention documents window={window} {dtype}", out, out_r, TOL[dtype])
    check(f"flex attention documents window={window} {dtype} gradients", grads, grads_r, 2 * TOL[dtype])


def test_dropless_moe_and_mamba_compile_fullgraph_on_cuda() -> None:
    from amer.blocks.common import Block

    for pattern, fam in (("E", {"moe": {"n_experts": 8, "d_ff": 256}}), ("M", {"mamba": {"chunk_size": 64}})):
        if pattern == "M" and not kernels.available()["mamba_ssm"]:
            continue
        cfg = ModelConfig(pattern=pattern, d_model=128, **fam)
        torch.manual_seed(0)
        blk = Block(cfg.family_config(pattern), cfg.dims, cfg.parsed.layers[0]).to(CUDA)
        x = torch.randn(2, 128, 128, device=CUDA)
        y_ref = blk(x)[0]
        torch._dynamo.reset()
        try:
            y = torch.compile(blk, fullgraph=True, backend="aot_eager")(x)[0]
        finally:
            torch._dynamo.reset()
        check(f"{pattern} block compiled vs eager", y, y_ref, TOL[torch.float32])
