"""E family routers of current models: every option against a plain token-by-token reference written here (fp64,
outputs and gradients, both dispatches, the grouped-GEMM path in fp32), the balancing loss of sigmoid routers,
the whole mixer contract for option combinations, the auxiliary-loss-free expert bias, and today's defaults bit
for bit. Parity with transformers' own MoE blocks: test_moe_parity.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import test_documents as documents
import test_mixer_contract as contract
import torch
import torch.nn.functional as F
from torch import Tensor

from amer import HybridLM, ModelConfig, MoEConfig
from amer.blocks.moe import ROUTER_OPTIONS, MoEMixer
from amer.blocks.moe_router import route
from amer.config import TrainConfig
from amer.errors import ConfigError
from amer.ops import kernels
from amer.ops.activation import ACTIVATIONS
from amer.ops.moe import dispatch_dropless
from amer.training.optim import make_optimizer

D = 32
BASE = {"n_experts": 8, "top_k": 2, "d_ff": 12}


def make(dtype: torch.dtype = torch.float64, seed: int = 0, bias_scale: float = 0.3, **options: Any) -> MoEMixer:
    """A mixer with router weights far from uniform (no ties) and, with an expert bias, a random bias large
    enough to change choices."""
    cfg = ModelConfig(pattern="E", d_model=D, moe={**BASE, **options})
    torch.manual_seed(seed)
    m = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0]).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
        if m.expert_bias is not None:
            m.expert_bias.uniform_(-bias_scale, bias_scale)
    return m


def inputs(dtype: torch.dtype = torch.float64, B: int = 2, T: int = 9, seed: int = 1) -> Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# the plain reference: one token at a time, choices made by sorting Python lists


def _act(name: str) -> tuple[Callable[[Tensor], Tensor], bool]:
    return {"silu": (F.silu, True), "gelu_tanh": (lambda v: F.gelu(v, approximate="tanh"), True),
            "relu2": (lambda v: F.relu(v) ** 2, False), "gelu": (F.gelu, False)}[name]


def reference(m: MoEMixer, x: Tensor, o: MoEConfig) -> Tensor:
    """What the E block with options ``o`` computes, written out per token from its weights."""
    fn, gated = _act(o.activation)
    E, k, Fh = o.n_experts, o.top_k, m.w_down.shape[1]
    bias = [float(b) for b in m.expert_bias] if o.expert_bias else [0.0] * E
    out = []
    for v in x.reshape(-1, x.shape[-1]):
        logits = m.router.weight @ v
        s = torch.softmax(logits, 0) if o.score == "softmax" else torch.sigmoid(logits)
        c = [float(s[e].detach()) + bias[e] for e in range(E)]
        allowed = list(range(E))
        if o.n_groups > 1:
            size = E // o.n_groups
            rank = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(o.n_groups)]
            groups = sorted(range(o.n_groups), key=lambda g: -rank[g])[:o.topk_groups]
            allowed = [e for e in allowed if e // size in groups]
        chosen = sorted(allowed, key=lambda e: -c[e])[:k]
        w = torch.stack([s[e] for e in chosen])
        if o.renormalize and (k > 1 or o.renormalize_top1):
            w = w / (w.sum() + o.renormalize_eps)
        w = w * o.routed_scale
        h = v if m.to_latent is None else m.to_latent.weight @ v
        y = torch.zeros_like(h)
        for wj, e in zip(w, chosen):
            a = h @ m.w_gate_up[e]
            y = y + wj * ((fn(a[:Fh]) * a[Fh:] if gated else fn(a)) @ m.w_down[e])
        if m.from_latent is not None:
            y = m.from_latent.weight @ y
        if m.shared is not None:
            a = m.shared.gate_up.weight @ v
            n = a.shape[0] // 2
            sh = m.shared.down.weight @ (fn(a[:n]) * a[n:] if gated else fn(a))
            if m.shared_gate is not None:
                sh = torch.sigmoid(m.shared_gate.weight @ v) * sh
            y = y + sh
        out.append(y)
    return torch.stack(out).reshape(x.shape)


CASES: dict[str, dict[str, Any]] = {
    "raw-topk": {"renormalize": False},
    "raw-top3": {"renormalize": False, "top_k": 3},
    "sigmoid": {"score": "sigmoid"},
    "sigmoid-top1": {"score": "sigmoid", "top_k": 1},
    "bias-eps-scale": {"score": "sigmoid", "expert_bias": True, "renormalize_eps": 0.05, "routed_scale": 2.5},
    "softmax-bias": {"expert_bias": True, "renormalize": False},
    "groups": {"score": "sigmoid", "expert_bias": True, "n_groups": 4, "topk_groups": 2, "top_k": 3,
               "routed_scale": 2.5},
    "groups-softmax": {"n_groups": 2, "topk_groups": 1},
    "shared-gated": {"shared_expert": True, "n_shared_experts": 2, "d_ff_shared": 8, "shared_expert_gate": True},
    "relu2": {"activation": "relu2"},
    "gelu": {"activation": "gelu"},
    "gelu_tanh": {"activation": "gelu_tanh", "shared_expert": True},
    "latent": {"score": "sigmoid", "activation": "relu2", "d_latent": 16, "shared_expert": True, "expert_bias": True},
}


def _config(options: dict[str, Any]) -> MoEConfig:
    return MoEConfig(**{**BASE, **options})


def _assert_outputs_and_grads(m: MoEMixer, x: Tensor, want_fn: Callable[[Tensor], Tensor], tol: float) -> None:
    params = [x, *m.parameters()]
    y = m(x).y
    want = want_fn(x)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    got = torch.autograd.grad((y * probe).sum(), params)
    ref = torch.autograd.grad((want * probe).sum(), params)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda msg, name=name: f"{name}: {msg}")


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_option_matches_the_plain_reference_fp64(case: str, dispatch: str) -> None:
    """Outputs and the gradients of the input and every parameter; capacity at a factor that never drops
    (``n_experts / top_k``) equals the dropless result."""
    options = {**CASES[case], "dispatch": dispatch, "capacity_factor": 8.0}
    m = make(**options)
    x = inputs().requires_grad_()
    _assert_outputs_and_grads(m, x, lambda v: reference(m, v, _config(options)), 1e-10)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_routing_option_changes_the_output(case: str) -> None:
    """Negative control of the reference test: the reference with any one routing option at its default
    disagrees with the block, so the block's agreement above is about that option."""
    options = CASES[case]
    m = make(**options)
    x = inputs()
    y = m(x).y.detach()
    plain = MoEConfig()
    for name in set(options) & {*ROUTER_OPTIONS, "renormalize_top1", "top_k"} - {"d_latent"}:
        default = {"top_k": BASE["top_k"]}.get(name, getattr(plain, name))
        if default == options[name]:
            continue
        changed = {**options, name: default}
        if name == "n_groups":
            changed["topk_groups"] = 1
        if name == "renormalize":
            changed["renormalize_top1"] = False
        if changed.get("top_k", 2) > changed.get("topk_groups", 1) * 8 // changed.get("n_groups", 1):
            continue
        with torch.no_grad():
            other = reference(m, x, _config(changed))
        assert (y - other).abs().max() > 1e-6, f"{case}: {name} at its default gives the same output"


FP32_CASES = ["relu2", "gelu", "gelu_tanh", "latent", "groups", "shared-gated"]


@pytest.mark.parametrize("case", FP32_CASES)
def test_grouped_gemm_path_matches_the_reference_fp32(case: str) -> None:
    """In fp32 the dropless dispatch runs the ``amer::grouped_swiglu`` custom op (every activation), and agrees
    with the fp64 reference; its fp64 twin takes the reference loop."""
    m = make(torch.float32, **CASES[case])
    assert kernels.grouped_mm_unavailable(m.w_gate_up.device, torch.float32, tuple(m.w_gate_up.shape[1:])) is None
    m64 = copy.deepcopy(m).double()
    x = inputs(torch.float32).requires_grad_()
    y = m(x).y
    want = reference(m64, x.detach().double(), _config(CASES[case]))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((y * probe).sum(), [x, m.w_gate_up, m.w_down])
    x64 = x.detach().double().requires_grad_()
    ref = torch.autograd.grad((reference(m64, x64, _config(CASES[case])) * probe.double()).sum(),
                              [x64, m64.w_gate_up, m64.w_down])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a != "silu"])
def test_the_grouped_custom_op_passes_torch_opcheck_for_every_activation(act: str) -> None:
    import amer.ops.grouped  # noqa: F401  (registers the op)

    g = torch.Generator().manual_seed(3)
    width = 48 if ACTIVATIONS[act].gated else 24
    xs = torch.randn(24, 16, generator=g, requires_grad=True)
    wgu = torch.randn(3, 16, width, generator=g, requires_grad=True)
    wd = torch.randn(3, 24, 16, generator=g, requires_grad=True)
    offs = torch.tensor([10, 10, 24], dtype=torch.int32)
    torch.library.opcheck(torch.ops.amer.grouped_swiglu_fwd, (xs, wgu, wd, offs, act))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decoding_sized_inference_equals_the_training_path(case: str) -> None:
    """One token without gradients takes the no-dispatch path; it computes what the dispatch computes."""
    m = make(**CASES[case])
    x = inputs(B=2, T=1)
    want = m(x).y.detach()
    with torch.no_grad():
        got = torch.cat([m(x[i:i + 1]).y for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# balancing losses and statistics of a sigmoid router


def test_sigmoid_router_balancing_loss_uses_the_normalised_scores_and_the_real_choice() -> None:
    """moe_lb = E sum_e f_e P_e with P the per-token sigmoid scores normalised to sum 1 (DeepSeek-V3) and f the
    slots actually routed (bias and group limits included); its gradient reaches the router; the entropy is that
    of the normalised scores."""
    o = {"score": "sigmoid", "expert_bias": True, "n_groups": 4, "topk_groups": 2, "top_k": 3,
         "aux_loss_coef": 1.0, "z_loss_coef": 1.0}
    m = make(**o)
    x = inputs()
    out = m(x)
    logits = x @ m.router.weight.T
    s = torch.sigmoid(logits)
    p = s / s.sum(-1, keepdim=True)
    choice = (s + m.expert_bias).reshape(-1, 4, 2)
    best = choice.sort(-1, descending=True).values.sum(-1)  # groups of two: both scores
    keep = torch.zeros_like(best).scatter(-1, best.topk(2, -1).indices, 1.0).bool()
    idx = choice.masked_fill(~keep[..., None], -math.inf).reshape(-1, 8).topk(3, -1).indices
    f = torch.zeros(8, dtype=torch.float64).scatter_add(0, idx.reshape(-1), torch.ones(idx.numel(),
                                                                                        dtype=torch.float64))
    f = f / idx.numel()
    want = 8 * (f * p.reshape(-1, 8).mean(0)).sum()
    torch.testing.assert_close(out.aux["moe_lb"], want, rtol=1e-7, atol=0)  # f_e is counted in fp32
    torch.testing.assert_close(out.aux["moe_z"], torch.logsumexp(logits, -1).square().mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.stats["moe/router_entropy"], -(p * p.log()).sum(-1).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.stats["moe/load_max"], (f.max() * 8).float(), rtol=1e-6, atol=0)
    # the softmax of the logits (what transformers' generic loss would take) is a different number
    assert (want - 8 * (f * logits.softmax(-1).reshape(-1, 8).mean(0)).sum()).abs() > 1e-3
    (g,) = torch.autograd.grad(out.aux["moe_lb"], [m.router.weight])
    assert g.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_balancing_loss_is_one_for_a_uniform_router(k: int) -> None:
    m = make(score="sigmoid", top_k=k, aux_loss_coef=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
    out = m(inputs())
    torch.testing.assert_close(out.aux["moe_lb"], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(out.stats["moe/router_entropy"], torch.tensor(math.log(8), dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# the whole mixer contract (causality, decoding, packed documents, gradient reach, meta build, compile)

CONTRACT_VARIANTS: list[dict[str, Any]] = [
    {"score": "sigmoid", "expert_bias": True, "bias_update_rate": 0.01, "n_groups": 2, "topk_groups": 1,
     "routed_scale": 2.5, "shared_expert": True, "n_shared_experts": 2, "d_ff_shared": 16},
    {"renormalize": False, "shared_expert": True, "shared_expert_gate": True, "dispatch": "capacity",
     "capacity_factor": 4.0},
    {"score": "sigmoid", "activation": "relu2", "d_latent": 16, "shared_expert": True, "renormalize_eps": 1e-6},
    {"activation": "gelu", "dispatch": "capacity", "capacity_factor": 2.0},
]


@pytest.mark.parametrize("options", CONTRACT_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("check", contract.CONTRACT + documents.DOCUMENT_CONTRACT, ids=lambda f: f.__name__)
def test_option_variants_meet_the_contract(check: Callable[..., None], options: dict[str, Any]) -> None:
    check("E", **options)


# ------------------------------------------------------------------------------------------------
# auxiliary-loss-free balancing


def _skewed_model(rate: float = 0.02, **options: Any) -> HybridLM:
    """One E block whose router sends most tokens to experts 0 and 1: the embeddings share a direction u that
    those two experts' router rows look for."""
    cfg = ModelConfig(pattern="E", d_model=D, vocab_size=64, max_seq_len=64,
                      moe={**BASE, "score": "sigmoid", "expert_bias": True, "bias_update_rate": rate, **options})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    u = torch.randn(D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0).add_(u)
        model.blocks[0].mixer.router.weight.normal_(0.0, 0.3)
        model.blocks[0].mixer.router.weight[:2] += 0.3 * u
    return model


def _tokens(seed: int = 0) -> Tensor:
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed))


def _optimizer(model: HybridLM, lr: float = 0.0) -> torch.optim.Optimizer:
    """amer's optimizer (whose steps end with the mixers' ``after_step``); learning rate 0: only the bias moves."""
    opt = make_optimizer(model, TrainConfig())
    for group in opt.param_groups:
        group["lr"] = lr
    return opt


def _step(model: HybridLM, opt: torch.optim.Optimizer, tokens: Tensor) -> dict[str, Tensor]:
    out = model(tokens)
    (out.logits.float().square().mean() + sum(out.aux_losses.values())).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.stats


def test_the_expert_bias_moves_towards_balance_after_each_step() -> None:
    """After one step every over-loaded expert's bias went down by the rate and every under-loaded one's up;
    over steps (learning rate 0: only the bias changes) the busiest expert's load falls."""
    model = _skewed_model()
    mixer = model.blocks[0].mixer
    opt = _optimizer(model)
    load = _load_of(model, _tokens(0))
    first = _step(model, opt, _tokens(0))
    assert first["moe/load_max"] > 3.5  # 4: experts 0 and 1 take (nearly) every token
    torch.testing.assert_close(mixer.expert_bias, 0.02 * torch.sign(load.mean() - load))
    assert mixer.load.abs().sum() == 0  # the counts restart after each step
    later = [_step(model, opt, _tokens(i))["moe/load_max"] for i in range(1, 40)]
    assert sum(later[-10:]) / 10 < 0.6 * first["moe/load_max"]


def _load_of(model: HybridLM, tokens: Tensor) -> Tensor:
    """The slots per expert the first E block routes for ``tokens`` (with the bias it has now)."""
    mixer = model.blocks[0].mixer
    h = model.blocks[0].norm(model.embed(tokens))
    logits = h.float() @ mixer.router.weight.T
    idx = route(logits, mixer.top_k, bias=mixer.expert_bias, **mixer.route_options)[2]
    return torch.zeros(mixer.n_experts).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel()))


def test_no_update_without_a_training_step() -> None:
    """Evaluation forwards (eval mode, or no gradients) count nothing; a step after them changes nothing; a rate
    of 0 never moves the bias (negative control of the test above)."""
    model = _skewed_model()
    opt = _optimizer(model)
    model.eval()
    model(_tokens())
    with torch.no_grad():
        model.train()
        model(_tokens())
    opt.step()
    assert model.blocks[0].mixer.expert_bias.abs().sum() == 0
    frozen = _skewed_model(rate=0.0)
    _step(frozen, _optimizer(frozen), _tokens())
    assert frozen.blocks[0].mixer.expert_bias.abs().sum() == 0


def test_the_expert_bias_never_gets_a_gradient_and_is_saved(tmp_path) -> None:
    """A buffer, not a parameter: no gradient, not in the optimizer; a checkpoint carries it (and not the
    per-step counts), and the loaded model routes with it."""
    from amer.checkpoint import load_checkpoint, save_checkpoint
    from amer.configio import to_dict

    model = _skewed_model()
    mixer = model.blocks[0].mixer
    opt = _optimizer(model, 1e-3)
    for i in range(3):
        _step(model, opt, _tokens(i))
    assert not mixer.expert_bias.requires_grad and mixer.expert_bias.grad is None
    assert all(p is not mixer.expert_bias for g in opt.param_groups for p in g["params"])
    assert "blocks.0.mixer.expert_bias" not in dict(model.named_parameters())
    state = model.state_dict()
    assert "blocks.0.mixer.expert_bias" in state and "blocks.0.mixer.load" not in state
    assert mixer.expert_bias.abs().sum() > 0
    save_checkpoint(tmp_path / "ck", model, opt, {"config": {"model": to_dict(model.cfg)}})
    loaded, _ = load_checkpoint(tmp_path / "ck")
    torch.testing.assert_close(loaded.blocks[0].mixer.expert_bias, mixer.expert_bias, rtol=0, atol=0)
    assert loaded.blocks[0].mixer.load is not None and not loaded.blocks[0].mixer.load.is_meta
    model.eval()
    torch.testing.assert_close(loaded(_tokens(7)).logits, model(_tokens(7)).logits, rtol=0, atol=0)


def test_activation_checkpointing_and_accumulation_give_the_same_update() -> None:
    """Recomputing a block's forward in backward counts its slots twice, which the sign ignores: the bias after a
    step equals the plain run's; the choice of experts inside a step does not change before the step ends."""
    from amer.training.checkpointing import apply_activation_checkpointing

    plain, ckpt = _skewed_model(), _skewed_model()
    apply_activation_checkpointing(ckpt, "blocks")
    for model in (plain, ckpt):
        opt = _optimizer(model)
        for micro in range(2):  # two micro-batches, one step
            out = model(_tokens(micro))
            (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
        opt.step()
    torch.testing.assert_close(ckpt.blocks[0].mixer.expert_bias, plain.blocks[0].mixer.expert_bias, rtol=0, atol=0)
    assert plain.blocks[0].mixer.expert_bias.abs().sum() > 0


def test_a_model_with_the_update_builds_empty_and_takes_its_weights() -> None:
    """The per-step counts are not saved: ``assign`` (meta build, then the weights) recreates them."""
    model = _skewed_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    empty = HybridLM.empty(model.cfg).assign(state)
    assert empty.blocks[0].mixer.load.device.type == "cpu"
    torch.testing.assert_close(empty(_tokens()).logits, model(_tokens()).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# today's defaults, bit for bit


@pytest.mark.parametrize("options", [{}, {"top_k": 1, "shared_expert": True}, {"dispatch": "capacity"},
                                     {"top_k": 1, "renormalize_top1": True}])
def test_defaults_compute_exactly_the_switch_mixtral_block(options: dict[str, Any]) -> None:
    """With the new options at their defaults the block is softmax top-k, renormalised for k > 1, SwiGLU experts
    dispatched as before, plus the shared expert: equal bit for bit to that formula written here, and no buffer
    is added to the model's state."""
    cfg = ModelConfig(pattern="E", d_model=D, moe={"n_experts": 8, "d_ff": 48, **options})
    torch.manual_seed(0)
    m = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0])
    assert set(m.state_dict()) <= {"router.weight", "w_gate_up", "w_down", "shared.gate_up.weight",
                                   "shared.down.weight"}
    x = inputs(torch.float32)
    out = m(x)
    probs = (x @ m.router.weight.T).softmax(-1)
    top_p, idx = probs.topk(m.top_k, -1)
    w = top_p / top_p.sum(-1, keepdim=True) if m.top_k > 1 or m.renormalize_top1 else top_p
    if cfg.moe.dispatch == "capacity":
        from amer.ops.moe_capacity import block_capacity, dispatch_causal_capacity

        y = dispatch_causal_capacity(x, idx, w, m.w_gate_up, m.w_down, block=128,
                                     capacity=block_capacity(128, m.top_k, 8, 1.25))[0]
    else:
        y = dispatch_dropless(x, idx, w, m.w_gate_up, m.w_down)
    if m.shared is not None:
        gate, up = m.shared.gate_up(x).chunk(2, -1)
        y = y + m.shared.down(F.silu(gate) * up)
    assert torch.equal(out.y, y)
    assert torch.equal(out.aux["moe_lb"], 0.01 * 8 * ((torch.zeros(8).scatter_add_(
        0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()) * probs.mean((0, 1))).sum())


# ------------------------------------------------------------------------------------------------
# bad settings and what cannot be exported


@pytest.mark.parametrize("options, words", [
    ({"n_groups": 3}, "must divide moe.n_experts"),
    ({"n_groups": 4, "topk_groups": 5}, "moe.topk_groups (5) must be between 1 and moe.n_groups (4)"),
    ({"n_groups": 4, "topk_groups": 1, "top_k": 3}, "exceeds the experts of moe.topk_groups"),
    ({"bias_update_rate": 0.001}, "needs moe.expert_bias"),
    ({"score": "tanh"}, "moe.score must be one of"),
    ({"renormalize": False, "renormalize_top1": True}, "needs moe.renormalize"),
    ({"shared_expert_gate": True}, "needs moe.shared_expert"),
    ({"n_experts": 1, "d_latent": 8}, "moe.d_latent applies to routed experts"),
    ({"routed_scale": 0.0}, "moe.routed_scale must be > 0"),
    ({"activation": "tanh"}, "moe.activation must be one of"),
])
def test_bad_settings_are_one_line_errors(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        MoEConfig(**{**BASE, **options})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_a_router_mixtral_has_not(tmp_path) -> None:
    from amer.errors import InputError
    from amer.interop.export import export_transformers

    cfg = ModelConfig(pattern="AE", d_model=D, vocab_size=64, attention={"n_heads": 4},
                      moe={"n_experts": 4, "score": "sigmoid", "routed_scale": 2.0})
    with pytest.raises(InputError, match=r"moe.score='sigmoid' has no counterpart in MixtralForCausalLM"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
    cfg = ModelConfig(pattern="AE", d_model=D, vocab_size=64, attention={"n_heads": 4},
                      moe={"n_experts": 4, "routed_scale": 2.0})
    with pytest.raises(InputError, match=r"moe.routed_scale=2.0 has no counterpart in MixtralForCausalLM"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
