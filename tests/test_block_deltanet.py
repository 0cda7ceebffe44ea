"""Gated DeltaNet (the G family) and its kernel: the chunked delta rule against a sequential recurrence
written here (fp64, outputs, states and gradients), the mixer against a plain re-derivation of its
maths, parity with transformers' Qwen3-Next, OLMo-Hybrid and Kimi Linear layers under the weight mapping
of the module docstring, the option variants held to the whole mixer contract, and a model that mixes G
with other families.

Causality, gradient reach, prefill == decoding, split prefills, packed documents, meta build and
compilation of the default G block run for every family in test_mixer_contract.py / test_documents.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import test_documents as documents
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from mixer_checks import assert_matches_reference
from torch import Tensor

from amer import HybridLM, ModelConfig
from amer.blocks.gated_deltanet import DeltaNetCache, DeltaNetConfig, DeltaNetMixer
from amer.errors import ConfigError
from amer.ops import delta as delta_mod
from amer.ops.delta import delta_rule_chunked, delta_rule_step

# ------------------------------------------------------------------------------------------------
# the recurrence, one token at a time


def sequential(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
               seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S_t = diag(exp(g_t)) S_{t-1}; S_t += beta_t k_t (v_t - S_t^T k_t)^T; o_t = S_t^T q_t. Value head h
    reads key head h // R; the state is zeroed where the document number changes."""
    b, T, Hk, dk = k.shape
    H, dv = v.shape[-2:]
    R = H // Hk
    q, k = q.repeat_interleave(R, 2), k.repeat_interleave(R, 2)
    S = torch.zeros(b, H, dk, dv, dtype=v.dtype) if state is None else state
    out = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).to(S.dtype).view(b, 1, 1, 1)
        decay = g[:, t].exp()
        S = S * (decay.unsqueeze(-1) if g.dim() == 4 else decay[..., None, None])
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - pred))
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def kernel_inputs(b: int, T: int, Hk: int, R: int, dk: int, dv: int, channel: bool, neg: bool,
                  dtype: torch.dtype = torch.float64, decay: float = 2.0, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    H = Hk * R
    q = F.normalize(torch.randn(b, T, Hk, dk, generator=gen, dtype=dtype), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(b, T, Hk, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, T, H, dv, generator=gen, dtype=dtype)
    g = -decay * torch.rand(b, T, H, *((dk,) if channel else ()), generator=gen, dtype=dtype)
    beta = torch.rand(b, T, H, generator=gen, dtype=dtype) * (2.0 if neg else 1.0)
    s0 = torch.randn(b, H, dk, dv, generator=gen, dtype=dtype)
    return [q, k, v, g, beta, s0]


# (gate, R, T, chunk, allow_neg_eigval): T never a multiple of the chunk; the channel gate at chunk 64
# crosses sub-chunks (off-diagonal factorisation), at chunk 8 it has one explicit sub-chunk
KERNEL_CASES = [("head", 1, 37, 8, False), ("head", 2, 70, 32, True), ("head", 3, 5, 64, False),
                ("channel", 2, 70, 64, True), ("channel", 1, 37, 8, False), ("channel", 2, 21, 64, False)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_sequential_fp64(case: tuple, packed: bool) -> None:
    """Outputs, final state and the gradients of every input (initial state included) equal the
    token-by-token recurrence; with document numbers the state is cut at each start."""
    gate, R, T, chunk, neg = case
    inputs = kernel_inputs(2, T, 2, R, 8, 6, gate == "channel", neg)
    seq_idx = (torch.rand(2, T, generator=torch.Generator().manual_seed(3)) < 0.1).long().cumsum(1) if packed else None
    a = [t.clone().requires_grad_() for t in inputs]
    r = [t.clone().requires_grad_() for t in inputs]
    o, S = delta_rule_chunked(*a[:5], chunk, a[5], seq_idx)
    o_ref, S_ref = sequential(*r, seq_idx)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn(o.shape, generator=torch.Generator().manual_seed(4), dtype=o.dtype)
    probe_s = torch.randn(S.shape, generator=torch.Generator().manual_seed(5), dtype=S.dtype)
    grads = torch.autograd.grad((o * probe).sum() + (S * probe_s).sum(), a)
    grads_ref = torch.autograd.grad((o_ref * probe).sum() + (S_ref * probe_s).sum(), r)
    for name, got, want in zip(["q", "k", "v", "g", "beta", "s0"], grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_packed_rows_cut_the_state() -> None:
    """Negative control of the document cut: without it the later documents differ (the test above
    would see it), with it a document packed after others equals the same document alone."""
    q, k, v, g, beta, _ = kernel_inputs(1, 40, 2, 2, 8, 6, True, False, decay=0.05)
    seq_idx = torch.zeros(1, 40, dtype=torch.long)
    seq_idx[:, 23:] = 1
    packed, _ = delta_rule_chunked(q, k, v, g, beta, 16, None, seq_idx)
    alone, _ = delta_rule_chunked(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], beta[:, 23:], 16)
    uncut, _ = delta_rule_chunked(q, k, v, g, beta, 16)
    torch.testing.assert_close(packed[:, 23:], alone, rtol=1e-12, atol=1e-12)
    assert (uncut[:, 23:] - alone).abs().max() > 1e-2


def test_explicit_inverse_solve_equals_solve_triangular() -> None:
    """The UT transform's explicit-inverse node against autograd through ``solve_triangular`` (fp64,
    outputs and gradients): A's diagonal and upper triangle hold values that must be neither read nor given
    a gradient. Negative control: the same comparison with the full A (diagonal and upper part read)."""
    gen = torch.Generator().manual_seed(7)
    A = (0.3 * torch.randn(3, 2, 16, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    xs = [torch.randn(3, 2, 16, n, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 7)]
    probes = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    ys = delta_mod._UnitLowerSolve.apply(A, *xs)
    refs = [torch.linalg.solve_triangular(A, x, upper=False, unitriangular=True) for x in xs]
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(sum((y * p).sum() for y, p in zip(ys, probes)), [A, *xs])
    want = torch.autograd.grad(sum((r * p).sum() for r, p in zip(refs, probes)), [A, *xs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[0].triu().abs().max() == 0
    full = torch.linalg.solve(A + torch.eye(16, dtype=A.dtype), xs[0])
    assert (full - ys[0]).abs().max() > 1e-2


def test_state_pass_equals_the_autograd_loop() -> None:
    """The chunk-to-chunk node against the same loop under autograd (fp64, every output and gradient,
    per-head and per-channel carries)."""
    gen = torch.Generator().manual_seed(8)
    b, c, H, L, dk, dv = 2, 4, 3, 5, 4, 6
    for carry_shape in ((b, c, H, 1, 1), (b, c, H, dk, 1)):
        shapes = [(b, c, H, L, dv), (b, c, H, L, dk), (b, c, H, L, dk), carry_shape, (b, H, dk, dv)]
        ins = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
        U, W, K, carry, S = ins
        states, deltas = [], []
        for n in range(c):
            states.append(S)
            deltas.append(U[:, n] - W[:, n] @ S)
            S = K[:, n].transpose(-1, -2) @ deltas[-1] + carry[:, n] * S
        want = (torch.stack(states, 1), torch.stack(deltas, 1), S)
        got = delta_mod._StatePass.apply(*ins)
        probes = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in want]
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(sum((t * p).sum() for t, p in zip(got, probes)), ins)
        g_want = torch.autograd.grad(sum((t * p).sum() for t, p in zip(want, probes)), ins)
        for name, a, w in zip("U W K carry S0".split(), g_got, g_want):
            torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_step_matches_sequential() -> None:
    for channel in (False, True):
        q, k, v, g, beta, s0 = kernel_inputs(2, 1, 2, 2, 8, 6, channel, True)
        o, S = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
        o_ref, S_ref = sequential(q, k, v, g, beta, s0)
        torch.testing.assert_close(o, o_ref[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


def test_strong_channel_decay_stays_finite_in_fp32() -> None:
    """Per-channel decays of up to exp(-80) a step: the decay across a chunk of 64 is far below fp32's
    range, so the factorisation (k_i Gamma_i) . (k_j / Gamma_j) overflows (checked, the negative
    control); the sub-chunked kernel stays finite and equals the fp64 recurrence."""
    inputs = kernel_inputs(1, 64, 1, 2, 8, 6, True, False, dtype=torch.float32, decay=80.0)
    o, S = delta_rule_chunked(*inputs[:5], 64)
    o_ref, S_ref = sequential(*[t.double() for t in inputs[:5]])
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-5)
    k, G = inputs[1][0, :, 0], inputs[3][0, :, 0].cumsum(0)  # (T, dk): key head 0, value head 0
    naive = (k * G.exp()) @ (k * (-G).exp()).T
    assert not torch.isfinite(naive).all()


@pytest.mark.parametrize("channel", [False, True])
def test_bf16_inputs_accumulate_in_fp32(channel: bool) -> None:
    """bf16 inputs: the output keeps their dtype, the state is fp32, and both are the fp32 result rounded
    (the decays and the solve never run in bf16)."""
    inputs = kernel_inputs(2, 40, 2, 2, 8, 6, channel, False, dtype=torch.float32)
    low = [t.bfloat16() for t in inputs]
    o, S = delta_rule_chunked(*low[:5], 16, low[5])
    o32, S32 = delta_rule_chunked(*[t.float() for t in low[:5]], 16, low[5].float())
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(o, o32.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(S, S32, rtol=0, atol=0)
    o1, S1 = delta_rule_step(*[t[:, 0] for t in low[:5]], low[5])
    assert o1.dtype == torch.bfloat16 and S1.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the mixer against its maths written out


def make_mixer(seed: int = 0, d_model: int = 32, **kw: Any) -> DeltaNetMixer:
    settings = {**contract.SMALL["G"], **kw}
    cfg = ModelConfig(pattern="G", d_model=d_model, init_std=0.2, deltanet=settings)
    torch.manual_seed(seed)
    return DeltaNetMixer(cfg.deltanet, cfg.dims, cfg.parsed.layers[0])


def mixer_reference(m: DeltaNetMixer, x: Tensor) -> Tensor:
    """The G block computed from its parameters with plain torch ops and the sequential recurrence."""
    c, T = m.cfg, x.shape[1]
    qkv, z, b, a = F.linear(x, m.in_proj.weight, m.in_proj.bias).split(m.split, dim=-1)
    conv = F.conv1d(F.pad(qkv.transpose(1, 2), (c.d_conv - 1, 0)), m.conv_weight.unsqueeze(1), m.conv_bias,
                    groups=m.conv_dim)
    q, k, v = F.silu(conv.transpose(1, 2)).split([m.key_dim, m.key_dim, m.value_dim], -1)
    q, k = (t.unflatten(-1, (m.Hk, m.dk)) for t in (q, k))
    q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + 1e-6) / math.sqrt(m.dk)  # fla's l2norm
    k = k / torch.sqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(b) * (2 if c.allow_neg_eigval else 1)
    if m.gate_proj is not None:
        a = m.gate_proj(a)
    A = m.A_log.exp()
    if c.gate == "channel":
        g = -A[:, None] * F.softplus(a.unflatten(-1, (m.H, m.dk)) + m.dt_bias.view(m.H, m.dk))
    else:
        g = -A * F.softplus(a + m.dt_bias)
    o, _ = sequential(q, k, v.unflatten(-1, (m.H, m.dv)), g, beta)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + m.norm_eps) * m.norm_weight
    if c.output_gate != "none":
        z = (z if m.out_gate_proj is None else m.out_gate_proj(z)).unflatten(-1, (m.H, m.dv))
        o = o * (F.silu(z) if c.output_gate == "silu" else torch.sigmoid(z))
    return F.linear(o.reshape(x.shape[0], T, -1), m.out_proj.weight, m.out_proj.bias)


MIXER_VARIANTS = [
    {},  # GQA (4 value heads on 2 key heads), head gate, silu output gate
    {"gate": "channel", "output_gate": "sigmoid", "out_gate_rank": 6, "allow_neg_eigval": True,
     "conv_bias": True, "bias": True, "chunk_size": 16},  # KDA-like, all the extras on
    {"gate": "channel", "gate_rank": 0, "output_gate": "none", "n_k_heads": 2, "n_v_heads": 2, "head_v_dim": 8},
]


@pytest.mark.parametrize("options", MIXER_VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_mixer_matches_reference_fp64(options: dict[str, Any]) -> None:
    """Outputs and every parameter's gradient equal the written-out maths, T = 37 across chunks."""
    m = make_mixer(**options).double()
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, y_ref = m(x).y, mixer_reference(m, x)
    assert_matches_reference(y, y_ref, list(m.named_parameters()), probe_seed=2, tol=1e-10, grad_rtol=1e-8,
                             grad_atol=1e-10)


@pytest.mark.parametrize("options", MIXER_VARIANTS[1:], ids=lambda o: ",".join(o))
@pytest.mark.parametrize("check", contract.CONTRACT + documents.DOCUMENT_CONTRACT, ids=lambda f: f.__name__)
def test_option_variants_meet_the_contract(check: Callable[..., None], options: dict[str, Any]) -> None:
    check("G", **options)


def test_document_cuts_inside_a_chunk() -> None:
    """With chunks of 16 the cuts at 8 (and 5, 17) fall inside a chunk: the per-document decay sums keep
    later documents bit-identical when an earlier one changes."""
    documents.check_documents_independent("G", chunk_size=16)
    documents.check_documents_packed_equals_alone("G", chunk_size=16)


# ------------------------------------------------------------------------------------------------
# parity with transformers' layers (their torch paths), weights mapped as the module docstring says

D_HF = 32


def _amer_mixer(**options: Any) -> DeltaNetMixer:
    cfg = ModelConfig(pattern="G", d_model=D_HF, deltanet={"chunk_size": 8, **options})
    return DeltaNetMixer(cfg.deltanet, cfg.dims, cfg.parsed.layers[0]).eval()


def _randomise(layer: torch.nn.Module, A_log: Tensor) -> None:
    """Every weight visibly away from its init (norm weights and biases included), decays moderate."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
        A_log.uniform_(-1.0, 1.0)


def qwen3_next_pair() -> tuple[Any, Any, DeltaNetMixer]:
    tf = pytest.importorskip("transformers")
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
    Hk, H, dk, dv = 2, 4, 8, 12
    hc = tf.Qwen3NextConfig(hidden_size=D_HF, linear_num_key_heads=Hk, linear_num_value_heads=H,
                            linear_key_head_dim=dk, linear_value_head_dim=dv, linear_conv_kernel_dim=4,
                            num_hidden_layers=1, layer_types=["linear_attention"], rms_norm_eps=1e-6,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    ref = Qwen3NextGatedDeltaNet(hc, 0).eval()
    _randomise(ref, ref.A_log)
    m = _amer_mixer(n_k_heads=Hk, n_v_heads=H, head_k_dim=dk, head_v_dim=dv, norm_eps=hc.rms_norm_eps)
    R = H // Hk
    with torch.no_grad():
        # in_proj_qkvz / in_proj_ba are grouped by key head: regroup into [q; k; v; z; b; a]
        q, k, v, z = ref.in_proj_qkvz.weight.view(Hk, -1, D_HF).split([dk, dk, R * dv, R * dv], dim=1)
        b, a = ref.in_proj_ba.weight.view(Hk, 2 * R, D_HF).split([R, R], dim=1)
        m.in_proj.weight.copy_(torch.cat([t.reshape(-1, D_HF) for t in (q, k, v, z, b, a)]))
        m.conv_weight.copy_(ref.conv1d.weight[:, 0])
        m.A_log.copy_(ref.A_log)
        m.dt_bias.copy_(ref.dt_bias)
        m.norm_weight.copy_(ref.norm.weight)
        m.out_proj.weight.copy_(ref.out_proj.weight)
    return ref, hc, m


def olmo_hybrid_pair() -> tuple[Any, Any, DeltaNetMixer]:
    tf = pytest.importorskip("transformers")
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet
    Hk, H, dk, dv = 2, 4, 8, 12
    hc = tf.OlmoHybridConfig(hidden_size=D_HF, linear_num_key_heads=Hk, linear_num_value_heads=H,
                             linear_key_head_dim=dk, linear_value_head_dim=dv, linear_allow_neg_eigval=True,
                             num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                             num_attention_heads=2, vocab_size=64, intermediate_size=64)
    ref = OlmoHybridGatedDeltaNet(hc, 0).eval()
    _randomise(ref, ref.A_log)
    m = _amer_mixer(n_k_heads=Hk, n_v_heads=H, head_k_dim=dk, head_v_dim=dv, allow_neg_eigval=True, norm_eps=1e-5)
    with torch.no_grad():
        m.in_proj.weight.copy_(torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight,
                                          ref.g_proj.weight, ref.b_proj.weight, ref.a_proj.weight]))
        m.conv_weight.copy_(ref.conv1d.weight[:, 0])
        m.A_log.copy_(ref.A_log)
        m.dt_bias.copy_(ref.dt_bias)
        m.norm_weight.copy_(ref.o_norm.weight)
        m.out_proj.weight.copy_(ref.o_proj.weight)
    return ref, hc, m


def kimi_linear_pair() -> tuple[Any, Any, DeltaNetMixer]:
    tf = pytest.importorskip("transformers")
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
    H, d = 4, 8
    hc = tf.KimiLinearConfig(hidden_size=D_HF, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                             intermediate_size=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             linear_attn_config={"head_dim": d, "num_heads": H, "short_conv_kernel_size": 4,
                                                 "kda_layers": [1], "full_attn_layers": [2]})
    ref = KimiLinearDeltaAttention(hc, 0).eval()
    fg = ref.forget_gate
    _randomise(ref, fg.A_log)
    m = _amer_mixer(n_k_heads=H, head_k_dim=d, head_v_dim=d, gate="channel", gate_rank=d, output_gate="sigmoid",
                    out_gate_rank=d, norm_eps=hc.rms_norm_eps)
    with torch.no_grad():
        m.in_proj.weight.copy_(torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight,
                                          ref.g_a_proj.weight, ref.b_proj.weight, fg.f_a_proj.weight]))
        m.out_gate_proj.weight.copy_(ref.g_b_proj.weight)
        m.gate_proj.weight.copy_(fg.f_b_proj.weight)
        m.conv_weight.copy_(ref.conv1d.weight[:, 0])
        m.A_log.copy_(fg.A_log.flatten())
        m.dt_bias.copy_(fg.dt_bias)
        m.norm_weight.copy_(ref.o_norm.weight)
        m.out_proj.weight.copy_(ref.o_proj.weight)
    return ref, hc, m


PAIRS = {"qwen3_next": qwen3_next_pair, "olmo_hybrid": olmo_hybrid_pair, "kimi_linear": kimi_linear_pair}
HF_T, HF_PREFILL = 27, 5  # crosses the mixer's chunks of 8, not a multiple of them


def _hf_inputs() -> Tensor:
    return torch.randn(2, HF_T, D_HF, generator=torch.Generator().manual_seed(7))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("source", list(PAIRS))
def test_transformers_parity(source: str) -> None:
    """The full forward, and a prefill then token-by-token decoding through each side's own cache, equal
    the transformers layer (fp32, 1e-5)."""
    from transformers import DynamicCache
    ref, hc, m = PAIRS[source]()
    x = _hf_inputs()
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(m(x).y, want, rtol=0, atol=1e-5)
        hf_cache, cache = DynamicCache(config=hc), m.init_cache(2, HF_T)
        theirs, ours = [], []
        for s, e in [(0, HF_PREFILL), *((t, t + 1) for t in range(HF_PREFILL, HF_T))]:
            theirs.append(ref(x[:, s:e], cache=hf_cache))
            out = m(x[:, s:e], cache=cache)
            ours.append(out.y)
            cache = out.cache
        torch.testing.assert_close(torch.cat(ours, 1), torch.cat(theirs, 1), rtol=0, atol=1e-5)
        assert isinstance(cache, DeltaNetCache) and cache.state.dtype == torch.float32


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("source", list(PAIRS))
def test_transformers_parity_negative_control(source: str) -> None:
    """One parameter off by a little (a head's decay rate) is seen far above the parity tolerance."""
    ref, _, m = PAIRS[source]()
    x = _hf_inputs()
    with torch.no_grad():
        m.A_log[1] += 0.2
        assert (m(x).y - ref(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# in a model, in the registry's readers, and the config


def test_hybrid_model_with_g_blocks_trains_and_taps() -> None:
    """AGEG: G-1 / G0 select the G blocks' taps, a few AdamW steps with CE + STP on G-1 keep every
    gradient finite and non-zero and lower the loss; A_log, dt_bias and the norm gain skip weight decay."""
    from amer.config import TrainConfig
    from amer.stp import compute_stp_loss
    from amer.training.optim import make_optimizer

    cfg = ModelConfig(pattern="AGEG", d_model=32, vocab_size=64, max_seq_len=64,
                      attention=contract.SMALL["A"], moe=contract.SMALL["E"], deltanet=contract.SMALL["G"])
    torch.manual_seed(0)
    model = HybridLM(cfg).train()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    no_decay = {id(p) for group in opt.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    for name, p in model.named_parameters():
        if name.split(".")[-1] in ("A_log", "dt_bias", "norm_weight"):
            assert id(p) in no_decay, name
    losses = []
    for _ in range(4):
        out = model(tokens)
        (g_last,) = out.taps.select("G-1")
        assert (g_last.layer, g_last.family) == (3, "G")
        assert out.taps.select("G0")[0].layer == 1
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss = ce + 0.1 * compute_stp_loss(g_last.hidden, 4, generator=torch.Generator().manual_seed(2))
        loss = loss + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        contract.assert_live_grads(model.named_parameters(), "AGEG")
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < losses[0]


def test_patterns_lists_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    from amer.cli import main

    assert main(["patterns", "AGEG"]) == 0
    out = capsys.readouterr().out
    assert "A/M/E/R/G" in out.splitlines()[0] and "1/0/1/0/2" in out
    assert any(ln.split()[:3] == ["G", "deltanet", "[model.deltanet]"] for ln in out.splitlines() if ln.strip())


@pytest.mark.parametrize("options,message", [
    ({"gate": "kda"}, r"deltanet.gate must be .*'head'.*'channel'.*got 'kda'"),
    ({"output_gate": "gelu"}, "deltanet.output_gate must be"),
    ({"n_k_heads": 4, "n_v_heads": 6}, r"n_v_heads \(6\) must be a multiple of deltanet.n_k_heads \(4\)"),
    ({"n_k_heads": 3}, r"d_model \(32\) must be divisible by deltanet.n_k_heads \(3\)"),
    ({"gate_rank": 4}, "gate_rank applies to the channel gate only"),
    ({"output_gate": "none", "out_gate_rank": 4}, "out_gate_rank needs an output gate"),
    ({"a_init_range": (0.0, 16.0)}, "a_init_range must be 0 < lo <= hi"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_settings_are_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(pattern="G", d_model=32, deltanet=options)


def test_initialisation() -> None:
    """A = exp(A_log) in the init range, softplus(dt_bias) in [dt_min, dt_max], norm gains 1, the
    residual-writing out_proj at out_std and the input projection at init_std."""
    cfg = ModelConfig(pattern="GGGG", d_model=256, deltanet={"n_k_heads": 8, "gate": "channel"})
    torch.manual_seed(0)
    m = DeltaNetMixer(cfg.deltanet, cfg.dims, cfg.parsed.layers[0])
    A, dt = m.A_log.exp(), F.softplus(m.dt_bias)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_bias.shape == (8 * 32,) and m.gate_proj.weight.shape == (8 * 32, 32)
    assert torch.equal(m.norm_weight, torch.ones(32))
    assert abs(m.out_proj.weight.std().item() / cfg.dims.out_std - 1) < 0.05
    assert abs(m.in_proj.weight.std().item() / cfg.dims.init_std - 1) < 0.05
    assert m.conv_bias is None and m.out_gate_proj is None


def test_config_defaults_and_flops_terms() -> None:
    """Defaults: key width = value width = d_model; the FLOP count's projection term is the linear layers'
    weights per token and the kernel terms follow the chunked schedule."""
    cfg = ModelConfig(pattern="G", d_model=64, deltanet=DeltaNetConfig())
    m = DeltaNetMixer(cfg.deltanet, cfg.dims, cfg.parsed.layers[0])
    assert (m.Hk, m.H, m.dk, m.dv) == (4, 4, 16, 16)
    f = m.flops(128)
    assert f["proj"] == 128 * (64 * (3 * 64 + 64 + 4 + 4) + 64 * 64)
    L, c = 32, 4
    # per value head: the solve for (I + A)^-1 against L identity columns (L^3 / 2 multiply-adds), that inverse
    # applied to the (L, dk + dv) right-hand sides, and the masked (L, L) @ (L, dv) attention
    assert f["intra"] == c * (4 * 2 * L * L * 16 + 4 * (L ** 3 / 2 + L * L * 32 + L * L * 16))
    assert f["state"] == c * 4 * 3 * L * 16 * 16


def test_flops_match_the_products_executed() -> None:
    """The delta rule's FLOP terms, less the triangular solve (which torch's counter does not see), equal the
    batched products ``delta_rule_chunked`` runs as counted by ``torch.utils.flop_counter``: a term counted
    twice or left out shows here (for example the inverse's products counted as 2 L^2 (dk + dv))."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(pattern="G", d_model=64, deltanet=DeltaNetConfig())
    m = DeltaNetMixer(cfg.deltanet, cfg.dims, cfg.parsed.layers[0])
    T = 128
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, T, m.Hk, m.dk, generator=g) for _ in range(2))
    v = torch.randn(1, T, m.H, m.dv, generator=g)
    with FlopCounterMode(display=False) as counter:
        delta_rule_chunked(q, k, v, -torch.rand(1, T, m.H, generator=g), torch.rand(1, T, m.H, generator=g),
                           m.chunk_size)
    f = m.flops(T)
    L, c = m.chunk_size, T // m.chunk_size
    solve = c * m.H * L ** 3 / 2
    assert counter.get_total_flops() == 2 * (f["intra"] - solve + f["state"])
