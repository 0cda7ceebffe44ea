"""Mamba-1 (the S family): the selective scan and the whole mixer against plain sequential recurrences
written here, parity with transformers' Mamba, Falcon-Mamba and Jamba mixers, initialisation, options.

Causality, gradient reach, prefill == decoding, split prefills, the meta build, compilation and packed
documents are checked for every family (S included) in test_mixer_contract.py and test_documents.py; the
option variants below run those same clauses.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import test_documents as documents
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from mixer_checks import assert_decodes_like_transformers, assert_matches_reference
from torch import Tensor

from amer import HybridLM, ModelConfig
from amer.blocks.mamba1 import Mamba1Cache, Mamba1Config, Mamba1Mixer
from amer.config import ConfigError
from amer.families import Family
from amer.ops.selective_scan import selective_scan, selective_scan_step
from amer.stp import compute_stp_loss
from amer.tap import resolve_selector

D = 32


def make_mixer(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> Mamba1Mixer:
    cfg = ModelConfig(pattern="S", d_model=D, init_std=0.2, mamba1={"d_state": 8, "chunk_size": 8, **kw})
    torch.manual_seed(seed)
    mixer = Mamba1Mixer(cfg.mamba1, cfg.dims, cfg.parsed.layers[0]).to(dtype)
    with torch.no_grad():  # every parameter off its init value, so a wrong one shows
        mixer.D.normal_(1.0, 0.5)
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        for p in (mixer.conv_bias, mixer.in_proj.bias, mixer.out_proj.bias):
            if p is not None:
                p.normal_(0.0, 0.2)
        for norm in mixer._norms():
            if norm is not None:
                norm.weight.normal_(1.0, 0.3)
    return mixer


# ------------------------------------------------------------------------------------------------ the scan


def recurrence(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None,
               keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective SSM one step at a time (Gu & Dao 2023, algorithm 2)."""
    b, T, E = u.shape
    h = torch.zeros(b, E, A.shape[1], dtype=u.dtype) if h0 is None else h0
    ys = []
    for t in range(T):
        a = torch.exp(dt[:, t, :, None] * A)
        if keep is not None:
            a = a * keep[:, t, None, None]
        h = a * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def scan_inputs(b: int, T: int, E: int, N: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, T, E, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, T, E, generator=g, dtype=dtype) - 1.0)
    A = -torch.exp(torch.randn(E, N, generator=g, dtype=dtype))
    B = torch.randn(b, T, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, N, generator=g, dtype=dtype)
    h0 = torch.randn(b, E, N, generator=g, dtype=dtype)
    return [u, dt, A, B, C, h0]


@pytest.mark.parametrize("T,chunk", [(37, 8), (37, 32), (75, 128), (16, 16), (5, 64), (1, 8), (50, 20)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_recurrence_fp64(T: int, chunk: int, with_h0: bool) -> None:
    """Outputs, final state and every gradient, T not a multiple of the chunk (which is cut into sub-chunks
    for chunk > 16), with and without an initial state."""
    args = scan_inputs(2, T, 6, 5)
    ours = [t.clone().requires_grad_() for t in args]
    ref = [t.clone().requires_grad_() for t in args]
    y, h = selective_scan(*ours[:5], ours[5] if with_h0 else None, chunk=chunk)
    y_ref, h_ref = recurrence(*ref[:5], ref[5] if with_h0 else None)
    assert y.dtype == h.dtype == torch.float64 and y.shape == (2, T, 6) and h.shape == (2, 6, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(9)
    wy, wh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    ((y * wy).sum() + (h * wh).sum()).backward()
    ((y_ref * wy).sum() + (h_ref * wh).sum()).backward()
    for name, a, r in zip(["u", "dt", "A", "B", "C", "h0"][: 6 if with_h0 else 5], ours, ref, strict=False):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10, msg=f"grad wrt {name}")


def test_scan_cut_at_document_starts_matches_recurrence_fp64() -> None:
    u, dt, A, B, C, _ = scan_inputs(2, 41, 4, 3, seed=1)
    keep = torch.ones(2, 41, dtype=torch.float64)
    keep[0, [0, 7, 16, 17, 33]] = 0  # mid-sub-chunk, on a block boundary, a one-token document
    keep[1, [0, 32]] = 0
    ours = [t.clone().requires_grad_() for t in (u, dt, A, B, C)]
    ref = [t.clone().requires_grad_() for t in (u, dt, A, B, C)]
    y, _ = selective_scan(*ours, keep=keep, chunk=32)
    y_ref, _ = recurrence(*ref, keep=keep)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10)
    # the control: without the cuts the outputs after the first start differ
    y_through, _ = selective_scan(u, dt, A, B, C, chunk=32)
    assert (y_through[0, 7:] - y[0, 7:].detach()).abs().max() > 1e-3


def test_scan_gradcheck() -> None:
    args = [t.requires_grad_() for t in scan_inputs(1, 11, 3, 2)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk=4), args)


def test_step_matches_scan() -> None:
    u, dt, A, B, C, h0 = scan_inputs(2, 1, 6, 5)
    y, h = selective_scan(u, dt, A, B, C, h0)
    y1, h1 = selective_scan_step(u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)
    torch.testing.assert_close(y1, y[:, 0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h1, h, rtol=1e-13, atol=1e-13)


def test_scan_extreme_decays_stay_finite() -> None:
    u, dt, A, B, C, h0 = scan_inputs(1, 40, 4, 3)
    dt, A = dt * 50 + 5.0, A * 10  # log-decays far below the fp32 exponent range
    args = [t.float().requires_grad_() for t in (u, dt, A, B, C, h0)]
    y, h = selective_scan(*args, chunk=16)
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert all(torch.isfinite(t.grad).all() for t in args)
    # with the decay complete, each step keeps only its own input
    torch.testing.assert_close(y[0, -1], (dt[0, -1] * u[0, -1] * (B[0, -1] * C[0, -1]).sum()).float(),
                               rtol=1e-5, atol=1e-5)


def test_scan_low_precision_inputs_keep_fp32_state() -> None:
    u, dt, A, B, C, h0 = (t.bfloat16() for t in scan_inputs(1, 20, 4, 3))
    y, h = selective_scan(u, dt, A, B, C, h0.float())
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = recurrence(*(t.double() for t in (u, dt, A, B, C, h0)))
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)  # bf16 inputs, fp32 accumulation


@pytest.mark.parametrize("with_state", [False, True])
def test_scan_operators_pass_opcheck(with_state: bool) -> None:
    """The scan's custom operators (what torch.compile sees): schema, shape-only fake implementation,
    autograd registration and AOT dispatch."""
    from amer.ops.selective_scan import _scan_bwd, _scan_fwd

    u, dt, A, B, C, h0 = (t.float().requires_grad_() for t in scan_inputs(2, 21, 6, 4))
    keep = torch.ones(2, 21)
    keep[0, 5] = 0
    args = (u, dt, A, B, C, h0 if with_state else None, keep if with_state else None, 8)
    torch.library.opcheck(_scan_fwd, args)
    y, h, entries = _scan_fwd(*args)
    plain = [t.detach() for t in (u, dt, A, B, C)]
    torch.library.opcheck(_scan_bwd, (torch.randn_like(y), torch.randn_like(h), *plain,
                                      h0.detach() if with_state else None, args[6], entries.detach(), 8))


def test_scan_runs_shape_only_on_meta() -> None:
    cfg = ModelConfig(pattern="S", d_model=D)
    with torch.device("meta"):
        mixer = Mamba1Mixer(cfg.mamba1, cfg.dims, cfg.parsed.layers[0])
        out = mixer(torch.randn(2, 10, D))
    assert out.y.shape == (2, 10, D) and out.y.is_meta


def test_scan_ignores_an_enclosing_autocast() -> None:
    """Inside the scan every matmul stays in fp32 under bf16 autocast: the results are bit-identical."""
    args = [t.float().requires_grad_() for t in scan_inputs(2, 21, 6, 4)]
    y, h = selective_scan(*args, chunk=8)
    grads = torch.autograd.grad(y.sum() + h.sum(), args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, h_ac = selective_scan(*args, chunk=8)
        grads_ac = torch.autograd.grad(y_ac.sum() + h_ac.sum(), args)
        u, dt, A, B, C, h0 = args
        y_step, _ = selective_scan_step(u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)
    assert torch.equal(y_ac, y) and torch.equal(h_ac, h)
    assert all(torch.equal(a, b) for a, b in zip(grads_ac, grads, strict=True))
    assert y_step.dtype == torch.float32
    torch.testing.assert_close(y_step, selective_scan(u[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], h0)[0][:, 0])


def test_scan_rejects_bad_shapes() -> None:
    u, dt, A, B, C, h0 = scan_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, dt, A.t(), B, C)
    with pytest.raises(ValueError, match="B and C must be"):
        selective_scan(u, dt, A, B[:, :3], C)
    with pytest.raises(ValueError, match="h0 must be"):
        selective_scan(u, dt, A, B, C, h0[:1])
    with pytest.raises(ValueError, match="chunk must be"):
        selective_scan(u, dt, A, B, C, chunk=0)


# ------------------------------------------------------------------------------------------------ the mixer


def reference_mixer(m: Mamba1Mixer, x: Tensor) -> Tensor:
    """The whole mixer with explicit loops: the convolution tap by tap, the SSM step by step."""
    K, eps = m.d_conv, m.cfg.dt_bc_norm_eps
    xs, z = F.linear(x, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)
    T = x.shape[1]
    conv = torch.zeros_like(xs) + (0 if m.conv_bias is None else m.conv_bias)
    for t in range(T):
        for k in range(K):
            s = t - (K - 1) + k
            if s >= 0:
                conv[:, t] = conv[:, t] + m.conv_weight[:, k] * xs[:, s]
    xs = conv * torch.sigmoid(conv)
    H, hd, R, N = m.n_heads, m.head_dim, m.dt_rank, m.d_state
    ys = []
    for h in range(H):  # each head its own selective maps, A and D (Zamba's multi-head Mamba-1)
        c = slice(h * hd, (h + 1) * hd)
        w = m.x_proj.weight[h * (R + 2 * N):(h + 1) * (R + 2 * N)]
        r, Bm, Cm = (xs[..., c] @ w.t()).split([R, N, N], dim=-1)
        if m.cfg.dt_bc_norm != "none":
            def rms(v: Tensor, w: Tensor | None) -> Tensor:
                v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
                return v if w is None else v * w
            r, Bm, Cm = (rms(v, None if n is None else n.weight) for v, n in zip((r, Bm, Cm), m._norms(), strict=True))
        dt = torch.log1p(torch.exp(r @ m.dt_proj.weight[c].t() + m.dt_proj.bias[c]))
        ys.append(recurrence(xs[..., c], dt, -torch.exp(m.A_log[c]), Bm, Cm)[0])
    y = (torch.cat(ys, -1) + m.D * xs) * (z * torch.sigmoid(z))
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("options", [
    {},
    {"dt_bc_norm": "weighted", "bias": True},
    {"dt_bc_norm": "weightless", "conv_bias": False, "chunk_size": 32, "dt_rank": 3},
    {"n_heads": 4, "dt_bc_norm": "weighted", "dt_rank": 3},
])
def test_mixer_matches_reference_fp64(options: dict[str, Any]) -> None:
    """Outputs and the gradients of the input and of every parameter, T = 37 (not a multiple of the chunk)."""
    mixer = make_mixer(dtype=torch.float64, **options)
    x = torch.randn(2, 37, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert_matches_reference(mixer(x).y, reference_mixer(mixer, x), [("x", x), *mixer.named_parameters()],
                             probe_seed=4, tol=1e-11, grad_rtol=1e-9, grad_atol=1e-10, live=True)


def test_norm_options_change_the_output() -> None:
    """The control of the test above: each norm setting is a different function of the same weights."""
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(5))
    outs = {}
    for norm in ("none", "weighted", "weightless"):
        mixer = make_mixer(dt_bc_norm=norm)
        if mixer.dt_norm is not None:
            for n in mixer._norms():
                n.reset_parameters()  # unit weights: differs from weightless only if the weights are not read
        with torch.no_grad():
            outs[norm] = mixer(x).y
    assert (outs["none"] - outs["weightless"]).abs().max() > 1e-3
    torch.testing.assert_close(outs["weighted"], outs["weightless"], rtol=1e-6, atol=1e-6)
    mixer = make_mixer(dt_bc_norm="weighted")
    with torch.no_grad():
        assert (mixer(x).y - outs["weighted"]).abs().max() > 1e-4  # non-unit norm weights are read


# ------------------------------------------------------------------------------------------------ transformers


def _hf_pair(kind: str) -> tuple[Any, Any, Mamba1Mixer]:
    """A transformers mixer of ``kind`` with randomised weights, its config, and the amer mixer holding the
    same weights through the mapping of amer/blocks/mamba1.py's docstring."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"d_state": 8, "d_conv": 4, "expand": 2, "dt_rank": 4, "chunk_size": 8}
    if kind == "mamba":
        from transformers.models.mamba.modeling_mamba import MambaMixer
        hfc = transformers.MambaConfig(hidden_size=D, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                                       num_hidden_layers=1, use_conv_bias=True, use_bias=True)
        hf, ours_cfg = MambaMixer(hfc, 0), {"bias": True}
    elif kind == "falcon_mamba":
        from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer
        hfc = transformers.FalconMambaConfig(hidden_size=D, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                                             num_hidden_layers=1, use_conv_bias=True, mixer_rms_eps=1e-6)
        # (its own init reads the norms before it builds them; every weight is set below anyway)
        hf = FalconMambaMixer(hfc, 0, initialize_mixer_weights=False)
        ours_cfg = {"dt_bc_norm": "weightless", "dt_bc_norm_eps": 1e-6}
    else:
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer
        hfc = transformers.JambaConfig(hidden_size=D, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                       num_hidden_layers=1, mamba_conv_bias=True, mamba_proj_bias=False,
                                       rms_norm_eps=1e-6, vocab_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = JambaMambaMixer(hfc, 0)
        ours_cfg = {"dt_bc_norm": "weighted", "dt_bc_norm_eps": 1e-6}
    hf.eval()
    with torch.no_grad():  # O(1) outputs with every weight away from its init
        for name, p in hf.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.arange(1, 9.0)).expand_as(p) + 0.3 * torch.randn_like(p))
            elif name == "dt_proj.bias":
                p.copy_(torch.log(torch.expm1(torch.empty_like(p).uniform_(0.01, 0.3))))
            elif name.endswith("layernorm.weight") or name == "D":
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.1 if p.dim() > 1 and p.shape[-1] > 4 else 0.4)
    cfg = ModelConfig(pattern="S", d_model=D, mamba1={**common, **ours_cfg})
    ours = Mamba1Mixer(cfg.mamba1, cfg.dims, cfg.parsed.layers[0])
    state = {}
    for name, value in hf.state_dict().items():
        if name.startswith(("dt_layernorm", "b_layernorm", "c_layernorm")):
            if kind == "falcon_mamba":
                continue  # unused buffers
            name = name.replace("_layernorm", "_norm")
        if name == "conv1d.weight":
            name, value = "conv_weight", value.squeeze(1)
        elif name == "conv1d.bias":
            name = "conv_bias"
        state[name] = value
    ours.load_state_dict(state, strict=True)
    return hf, hfc, ours


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "jamba"])
def test_parity_with_transformers(kind: str) -> None:
    """fp32, weights copied by the documented mapping: the full forward, token-by-token decoding and the
    final SSM state agree to 1e-5; a perturbed weight (the control) does not."""
    hf, hfc, ours = _hf_pair(kind)
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(1))
    ref, _, cache, hf_cache = assert_decodes_like_transformers(hf, hfc, ours, x)
    with torch.no_grad():
        torch.testing.assert_close(cache.ssm_state, hf_cache.get_recurrent_state(0).float(), rtol=1e-5, atol=1e-5)
        ours.A_log[3, 2] += 0.5  # negative control
        assert (ours(x).y - ref).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ the block


def test_init_follows_mamba() -> None:
    cfg = ModelConfig(pattern="S", d_model=64, mamba1={"d_state": 16, "dt_min": 0.002, "dt_max": 0.05})
    mixer = Mamba1Mixer(cfg.mamba1, cfg.dims, cfg.parsed.layers[0])
    assert mixer.dt_rank == 4  # 'auto': ceil(64 / 16)
    torch.testing.assert_close(mixer.A_log.detach(), torch.log(torch.arange(1, 17.0)).expand(128, 16))
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert (dt >= 0.002 * 0.999).all() and (dt <= 0.05 * 1.001).all()
    assert mixer.dt_proj.weight.abs().max() <= 1 / math.sqrt(4) and mixer.dt_proj.weight.std() > 0.1
    assert torch.equal(mixer.D.detach(), torch.ones(128))
    no_decay = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_log", "D", "dt_proj.bias"}
    assert {n for n, _ in mixer.named_parameters()} == {"in_proj.weight", "conv_weight", "conv_bias", "x_proj.weight",
                                                         "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                                                         "out_proj.weight"}
    assert mixer.x_proj.weight.shape == (4 + 2 * 16, 128) and mixer.in_proj.weight.shape == (256, 64)
    constant = Mamba1Mixer(Mamba1Config(dt_init="constant", dt_rank=8, dt_scale=2.0), cfg.dims, cfg.parsed.layers[0])
    assert torch.all(constant.dt_proj.weight == 2.0 / math.sqrt(8))
    weighted = Mamba1Mixer(Mamba1Config(dt_bc_norm="weighted"), cfg.dims, cfg.parsed.layers[0])
    no_decay = {n for n, p in weighted.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_log", "D", "dt_proj.bias", "dt_norm.weight", "b_norm.weight", "c_norm.weight"}


def test_cache_layout() -> None:
    mixer = make_mixer()
    cache = mixer.init_cache(3, 100, dtype=torch.bfloat16)
    assert isinstance(cache, Mamba1Cache)
    assert cache.conv_state.shape == (3, 3, 64) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, 64, 8) and cache.ssm_state.dtype == torch.float32


def test_flops_by_term() -> None:
    mixer = make_mixer()
    f = mixer.flops(10)
    assert f == {"proj": 10.0 * (32 * 128 + 64 * (2 + 16) + 2 * 64 + 64 * 32), "scan": 3.0 * 10 * 64 * 8}


@pytest.mark.parametrize("bad, fragment", [
    ({"dt_bc_norm": "layer"}, "dt_bc_norm"),
    ({"dt_init": "normal"}, "dt_init"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"dt_rank": 0}, "dt_rank"),
    ({"n_heads": 3}, "n_heads"),
])
def test_bad_settings_are_one_line_errors(bad: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as e:
        ModelConfig(pattern="S", d_model=D, mamba1=bad)
    assert "\n" not in str(e.value)


def test_registered() -> None:
    assert Family("S").spec.mixer is Mamba1Mixer and Family("S").spec.config_key == "mamba1"


def test_hybrid_model_trains_a_step_and_selects_taps() -> None:
    """A pattern with every new family next to the old ones: one optimiser step with CE + STP on the taps
    ``S0,C-1``, finite gradients everywhere, and a changed loss afterwards."""
    cfg = ModelConfig(pattern="ASEC", d_model=D, vocab_size=64, max_seq_len=64, moe={"n_experts": 4},
                      mamba1={"d_state": 8, "chunk_size": 8})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    assert [cfg.parsed[i - 1].name for i in resolve_selector("S0,C-1", cfg.parsed)] == ["S0", "C0"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn() -> Tensor:
        out = model(x)
        taps = out.taps.select("S0,C-1")
        assert [t.family for t in taps] == ["S", "C"]
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        stp = compute_stp_loss([t.hidden for t in taps], generator=torch.Generator().manual_seed(1))
        return ce + 0.1 * stp + sum(out.aux_losses.values())

    loss = loss_fn()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert loss_fn().item() != loss.item()


# ------------------------------------------------------------------------------------------------ options

VARIANTS = [
    {"dt_bc_norm": "weighted", "bias": True},
    {"dt_bc_norm": "weightless", "conv_bias": False, "dt_init": "constant", "dt_rank": 3, "chunk_size": 32},
    {"n_heads": 2, "bias": True},
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("check", contract.CONTRACT + documents.DOCUMENT_CONTRACT, ids=lambda f: f.__name__)
def test_option_variants_meet_the_contract(check: Any, options: dict[str, Any]) -> None:
    check("S", **options)
