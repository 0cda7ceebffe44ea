"""The mixer contract (:mod:`amer.blocks.common`), checked the same way for every registered block family.

Each ``check_*`` function takes a family letter (and optional overrides of that family's config) and
asserts one clause of the contract; the tests below run every clause for every family in the registry,
so a family added to ``amer/blocks`` is held to the contract without a line changed here. The toy family
of ``test_families.py`` runs the same functions.

The negative controls register a deliberately broken family (letter ``Z``; its config names the fault)
and show that each check rejects the fault it is about: a check that a broken mixer also passes would
prove nothing about the real ones.

Sizes are tiny but structural: T = 24 crosses Mamba's chunk of 8 and the recurrent scan's chunk of 16,
Mamba has two B/C groups, attention shares each KV head between two query heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from amer import HybridLM, ModelConfig
from amer.blocks.common import Block, Mixer, MixerOutput
from amer.config import check, opt
from amer.families import FamilySpec, families, get_family, register_family, unregister_family

D = 32  # d_model
B, T = 2, 24  # mixer-level batch and length
MODEL_T = 20  # model-level length (splits below land mid-chunk for Mamba and RG-LRU)
VOCAB = 64
ATOL = 1e-5  # cached vs uncached paths: different kernels and summation orders, same maths
SPLITS = (1, 5, 8, 13)  # a single token, mid-chunk, on a Mamba chunk boundary, past it
MODEL_SPLITS = (1, 7, 16)

# Per-family settings that make the tiny sizes exercise each family's structure; a family not listed
# runs with its config's defaults.
SMALL: dict[str, dict[str, Any]] = {
    "A": {"n_heads": 4, "n_kv_heads": 2},
    "M": {"d_state": 16, "head_dim": 16, "expand": 2, "n_groups": 2, "chunk_size": 8},
    "E": {"n_experts": 4, "top_k": 2, "d_ff": 48},
    "R": {"n_heads": 4, "d_conv": 4},
    "G": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 12, "chunk_size": 8},
    "S": {"d_state": 8, "chunk_size": 8},
    "D": {"n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
          "v_head_dim": 12},
    "N": {"n_heads": 4, "chunk_size": 8},
    "H": {"n_heads": 4, "n_kv_heads": 2, "d_ff": 48, "adapter_rank": 4, "rope": True},
}

LETTERS = [spec.letter for spec in families()]


def model_config(letter: str, *, init_std: float = 0.1, **family_cfg: Any) -> ModelConfig:
    """A two-layer model of one family (so the block-to-block hand-over of caches and taps is exercised).

    init_std 0.1 (not the training default 0.02) makes every block's update a large part of the logits,
    so a decoding cache that loses state moves them far above the tolerance.
    """
    spec = get_family(letter)
    settings = {**SMALL.get(letter, {}), **family_cfg}
    tables = {spec.config_key: settings}
    companions = (spec.companion,) if isinstance(spec.companion, str) else spec.companion or ()
    for other in families():  # a family whose mixer runs another's (its companion) gets that one's sizes too
        if other.config_key in companions:
            tables[other.config_key] = SMALL.get(other.letter, {})
    return ModelConfig(pattern=letter * 2, d_model=D, vocab_size=VOCAB, max_seq_len=64, init_std=init_std,
                       **tables)


def make_mixer(letter: str, seed: int = 0, **family_cfg: Any) -> Mixer:
    """The first mixer of a two-layer model, built as the registry says.

    init_std 0.2 (not the training default 0.02) makes every path of a mixer move its output visibly,
    so a cache that drops state or a position that leaks shows up far above the tolerances.
    """
    cfg = model_config(letter, init_std=0.2, **family_cfg)
    torch.manual_seed(seed)
    spec = get_family(letter)
    if spec.companion is None:
        return spec.mixer(cfg.family_config(letter), cfg.dims, cfg.parsed.layers[0])
    mixer = spec.mixer(cfg.family_config(letter), cfg.dims, cfg.parsed.layers[0],
                       companion=cfg.companion_config(cfg.parsed.layers[0]))
    return WithEmbedding(mixer) if mixer.reads_embedding else mixer


class WithEmbedding(nn.Module):
    """A mixer that reads the embedding output, given one made from its input token by token (a fixed projection),
    so that slicing the input for decoding slices the embedding with it and causality is the mixer's own."""

    def __init__(self, mixer: Mixer) -> None:
        super().__init__()
        self.inner = mixer
        self.register_buffer("proj", torch.randn(D, D, generator=torch.Generator().manual_seed(3)) / D**0.5)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def reset_parameters(self) -> None:
        self.inner.reset_parameters()

    def forward(self, x: Tensor, cache: Any = None, doc_ids: Any = None) -> MixerOutput:
        return self.inner(x, cache=cache, doc_ids=doc_ids, embed=torch.tanh(x @ self.proj))


def build_model(letter: str, seed: int = 0, **family_cfg: Any) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(model_config(letter, **family_cfg)).eval()


def inputs() -> Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def tokens() -> Tensor:
    return torch.randint(0, VOCAB, (B, MODEL_T), generator=torch.Generator().manual_seed(1))


def cache_leaves(cache: Any) -> list[Any]:
    """Caches are (nested) NamedTuples of tensors and positions; None for stateless mixers."""
    if isinstance(cache, (tuple, list)):
        return [leaf for item in cache for leaf in cache_leaves(item)]
    if isinstance(cache, dict):
        return [leaf for key in sorted(cache) for leaf in cache_leaves(cache[key])]
    return [cache]


def assert_same_cache(got: Any, want: Any, what: str) -> None:
    """Equal states mean decoding continues identically after either path. The states are fp32 and sums over many
    tokens (lightning's reach ~20), so a few ulps of summation order are allowed on top of ATOL."""
    a, b = cache_leaves(got), cache_leaves(want)
    assert len(a) == len(b), f"{what}: cache structures differ"
    for u, v in zip(a, b):
        if isinstance(u, Tensor):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=ATOL, msg=lambda m: f"{what}: cache differs: {m}")
        else:
            assert u == v, f"{what}: cache field {u!r} != {v!r}"


def assert_causal(run: Callable[[Tensor], Tensor], x: Tensor, perturb: Callable[[Tensor, int], Tensor],
                  positions: tuple[int, ...]) -> None:
    """Changing position t leaves every earlier output bit-identical, and does change output t
    (otherwise the probe could not have seen a leak)."""
    with torch.no_grad():
        ref = run(x)
        for t in positions:
            got = run(perturb(x, t))
            assert torch.equal(got[:, :t], ref[:, :t]), f"position {t} changed earlier outputs"
            assert (got[:, t] - ref[:, t]).abs().max() > 1e-4, f"position {t} has no effect on its own output"


def perturb_vectors(x: Tensor, t: int) -> Tensor:
    y = x.clone()
    y[:, t] += 3 * torch.randn(B, x.shape[-1], generator=torch.Generator().manual_seed(100 + t))
    return y


def perturb_tokens(x: Tensor, t: int) -> Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(B)) % VOCAB
    return y


def assert_live_grads(named: Any, what: str) -> None:
    for name, p in named:
        assert p.grad is not None, f"{what}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{what}: {name} has an all-zero gradient"


# ------------------------------------------------------------------------------------------------
# the clauses


def check_registry_entry(letter: str, **family_cfg: Any) -> None:
    """The spec is usable by every reader of the registry: the config table is complete (every field has a
    default and the ``--help`` text the CLI generates flags from) and ModelConfig exposes it by key."""
    spec = get_family(letter)
    assert issubclass(spec.mixer, Mixer), f"{spec.mixer} is not a Mixer"
    assert dataclasses.is_dataclass(spec.config)
    for f in dataclasses.fields(spec.config):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default, f"{spec.config_key}.{f.name} has no default"
        assert f.metadata.get("help"), f"{spec.config_key}.{f.name} has no help text"
    cfg = model_config(letter, **family_cfg)
    assert isinstance(cfg.family_config(letter), spec.config)
    assert getattr(cfg, spec.config_key) is cfg.family_config(letter)
    assert all(layer.family.spec is spec for layer in cfg.parsed.layers)


def check_output(letter: str, **family_cfg: Any) -> None:
    """Training path: a MixerOutput of the input's shape and dtype, no cache, scalar aux losses on the
    graph and scalar stats off it (the model sums and averages them across blocks)."""
    mixer = make_mixer(letter, **family_cfg)
    x = inputs()
    out = mixer(x)
    assert isinstance(out, MixerOutput)
    assert out.y.shape == x.shape and out.y.dtype == x.dtype
    assert torch.isfinite(out.y).all()
    assert out.cache is None
    for k, v in out.aux.items():
        assert v.dim() == 0 and torch.isfinite(v) and v.requires_grad, k
    for k, v in out.stats.items():
        assert v.dim() == 0 and torch.isfinite(v) and not v.requires_grad, k


def check_causal_mixer(letter: str, **family_cfg: Any) -> None:
    mixer = make_mixer(letter, **family_cfg)
    assert_causal(lambda x: mixer(x).y, inputs(), perturb_vectors, (0, 7, 8, 15, T - 1))


def check_causal_model(letter: str, **family_cfg: Any) -> None:
    model = build_model(letter, **family_cfg)
    assert_causal(lambda x: model(x, taps=False).logits, tokens(), perturb_tokens, (0, 7, 13, MODEL_T - 1))


def check_gradients_mixer(letter: str, **family_cfg: Any) -> None:
    """Every parameter and the input get a finite, non-zero gradient from the output and the aux losses."""
    mixer = make_mixer(letter, **family_cfg)
    x = inputs().requires_grad_()
    out = mixer(x)
    probe = torch.randn(out.y.shape, generator=torch.Generator().manual_seed(2))
    ((out.y * probe).sum() + sum(out.aux.values())).backward()
    assert_live_grads(mixer.named_parameters(), f"{letter} mixer")
    assert x.grad is not None and x.grad.abs().sum() > 0


def check_gradients_model(letter: str, **family_cfg: Any) -> None:
    model = build_model(letter, **family_cfg).train()
    x = tokens()
    out = model(x)
    assert out.logits.shape == (B, MODEL_T, VOCAB) and out.logits.dtype == torch.float32
    loss = F.cross_entropy(out.logits.flatten(0, 1), x.roll(-1, 1).flatten()) + sum(out.aux_losses.values())
    loss.backward()
    assert_live_grads(model.named_parameters(), f"{letter}{letter} model")


def check_prefill_equals_steps(letter: str, **family_cfg: Any) -> None:
    """A prefill with a cache, and one token at a time, both equal the training path; the two end in the
    same cache."""
    mixer = make_mixer(letter, **family_cfg)
    x = inputs()
    with torch.no_grad():
        full = mixer(x).y
        pre = mixer(x, cache=mixer.init_cache(B, T))
        torch.testing.assert_close(pre.y, full, rtol=0, atol=ATOL)
        cache, steps = mixer.init_cache(B, T), []
        for t in range(T):
            out = mixer(x[:, t:t + 1], cache=cache)
            assert out.y.shape == (B, 1, D)
            cache = out.cache
            steps.append(out.y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=ATOL)
    assert_same_cache(cache, pre.cache, f"{letter}: token by token vs prefill")


def check_split_prefill(letter: str, split: int = 8, **family_cfg: Any) -> None:
    """Prefill a prefix, then the rest from its cache: the outputs and the final cache equal one prefill."""
    mixer = make_mixer(letter, **family_cfg)
    x = inputs()
    with torch.no_grad():
        full = mixer(x, cache=mixer.init_cache(B, T))
        first = mixer(x[:, :split], cache=mixer.init_cache(B, T))
        rest = mixer(x[:, split:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.y, rest.y], 1), full.y, rtol=0, atol=ATOL)
    assert_same_cache(rest.cache, full.cache, f"{letter}: split at {split} vs one prefill")


def check_model_decoding(letter: str, **family_cfg: Any) -> None:
    """Through the model (two blocks of the family, each handing its cache back): token-by-token logits
    and split prefills equal the full forward."""
    model = build_model(letter, **family_cfg)
    x = tokens()
    with torch.no_grad():
        full = model(x, taps=False).logits
        cache, steps = model.init_cache(B, MODEL_T), []
        for t in range(MODEL_T):
            out = model(x[:, t:t + 1], taps=False, cache=cache)
            assert out.logits.shape == (B, 1, VOCAB)
            cache = out.cache
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=ATOL)
        for split in MODEL_SPLITS:
            first = model(x[:, :split], taps=False, cache=model.init_cache(B, MODEL_T))
            rest = model(x[:, split:], taps=False, cache=first.cache)
            torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=ATOL, rtol=ATOL,
                                       msg=lambda m: f"split at {split}: {m}")


def check_meta_build(letter: str, **family_cfg: Any) -> None:
    """A model of the family at a production width builds on the meta device: nothing is allocated or
    initialised for real, so a large stack can be sized (``amer patterns``) or sharded before it exists."""
    cfg = ModelConfig(pattern=letter * 2, d_model=4096, max_seq_len=4096,
                      **{get_family(letter).config_key: family_cfg})
    with torch.device("meta"):
        model = HybridLM(cfg)
    for name, p in model.named_parameters():
        assert p.is_meta, f"{name} was allocated on {p.device}"
    for name, b in model.named_buffers():
        assert b.is_meta, f"buffer {name} was allocated on {b.device}"
    assert model.num_params(non_embedding=True) > 2 * 4096


def check_compiles_fullgraph(letter: str, **family_cfg: Any) -> None:
    """The training path of a block (pre-norm + mixer, what the model runs) traces into one graph, and the
    compiled forward and gradients equal eager. aot_eager runs the same dynamo + AOT-autograd tracing as
    inductor without its CPU code generation."""
    cfg = model_config(letter, init_std=0.2, **family_cfg)
    torch.manual_seed(0)
    blk = Block(cfg.family_config(letter), cfg.dims, cfg.parsed.layers[0],
                companion=cfg.companion_config(cfg.parsed.layers[0]))
    x = inputs().requires_grad_()
    params = list(blk.parameters())
    g = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    extra = {"embed": torch.tanh(inputs().flip(1))} if blk.mixer.reads_embedding else {}

    def loss_and_grads(fn: Callable[..., Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
        y, out = fn(x, **extra)
        loss = (y * g).sum() + sum(out.aux.values())
        return y, torch.autograd.grad(loss, [x, *params])

    y_ref, grads_ref = loss_and_grads(blk)
    torch._dynamo.reset()
    try:
        y, grads = loss_and_grads(torch.compile(blk, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):  # atol grows with the gradient's scale: fp32 round-off of a deep mixer
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))


SENTINEL = 7.25  # no family initialises a parameter to this value


def check_reset_parameters(letter: str, **family_cfg: Any) -> None:
    """``reset_parameters`` rewrites every element of every parameter, from the RNG alone: what was there
    before does not matter, so a model re-initialised in place equals one built fresh."""
    mixer = make_mixer(letter, **family_cfg)
    params = dict(mixer.named_parameters())
    assert params, f"{letter} mixer has no parameters"

    def reset_from_sentinel() -> dict[str, Tensor]:
        with torch.no_grad():
            for p in params.values():
                p.fill_(SENTINEL)
        torch.manual_seed(5)
        mixer.reset_parameters()
        return {n: p.detach().clone() for n, p in params.items()}

    first = reset_from_sentinel()
    for name, value in first.items():
        assert not (value == SENTINEL).any(), f"reset_parameters left {name} (partly) untouched"
        assert torch.isfinite(value).all(), name
    second = reset_from_sentinel()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: reset depends on more than the RNG"


def check_meta_materialise(letter: str, **family_cfg: Any) -> None:
    """Built on the meta device, then given memory and initialised (what every rank does with its share under
    torchrun: ``to_empty``, ``init_buffers``, ``init_weights``), a model equals ``HybridLM(cfg, seed)`` exactly and
    keeps nothing the memory held before: ``reset_parameters`` covers every weight and saved buffer, and
    ``init_buffers`` every buffer the weights do not carry."""
    cfg = model_config(letter, **family_cfg)
    want = HybridLM(cfg, seed=7)
    model = HybridLM.empty(cfg).to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gives each name its own tensor
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.fill_(SENTINEL)
    model.init_buffers("cpu")
    model.init_weights(7)
    ref = dict(want.named_buffers())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not (t == SENTINEL).any(), f"{name} keeps values from before initialisation"
        assert torch.equal(t, dict(want.named_parameters()).get(name, ref.get(name))), \
            f"{name} differs from HybridLM(cfg, seed) built directly"


def check_flops(letter: str, **family_cfg: Any) -> None:
    """Positive, finite multiply-add counts by term, every term growing with the sequence length (FLOP
    budgets and MFU are computed from these)."""
    mixer = make_mixer(letter, **family_cfg)
    lengths = (1, 4, 16, 64)
    counts = [mixer.flops(t) for t in lengths]
    assert counts[0], f"{letter}: flops() reports no terms"
    for t, c in zip(lengths, counts):
        assert set(c) == set(counts[0]), f"{letter}: the terms change with the length"
        for term, v in c.items():
            assert isinstance(v, float) and 0 < v < float("inf"), f"{letter} flops({t})[{term!r}] = {v!r}"
    for term in counts[0]:
        series = [c[term] for c in counts]
        assert all(a < b for a, b in zip(series, series[1:])), f"{letter} {term!r} does not grow with T: {series}"


CONTRACT: tuple[Callable[..., None], ...] = (
    check_registry_entry, check_output, check_causal_mixer, check_causal_model, check_gradients_mixer,
    check_gradients_model, check_prefill_equals_steps, check_split_prefill, check_model_decoding,
    check_meta_build, check_compiles_fullgraph, check_reset_parameters, check_meta_materialise, check_flops,
)


# ------------------------------------------------------------------------------------------------
# every registered family


@pytest.mark.parametrize("letter", LETTERS)
def test_registry_entry(letter: str) -> None:
    check_registry_entry(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_output_contract(letter: str) -> None:
    check_output(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_mixer_is_causal(letter: str) -> None:
    check_causal_mixer(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_model_is_causal(letter: str) -> None:
    check_causal_model(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_gradients_reach_every_mixer_parameter(letter: str) -> None:
    check_gradients_mixer(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_gradients_reach_every_model_parameter(letter: str) -> None:
    check_gradients_model(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_prefill_equals_token_by_token(letter: str) -> None:
    check_prefill_equals_steps(letter)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("letter", LETTERS)
def test_split_prefill_equals_full(letter: str, split: int) -> None:
    check_split_prefill(letter, split)


@pytest.mark.parametrize("letter", LETTERS)
def test_model_decoding_equals_full_forward(letter: str) -> None:
    check_model_decoding(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_meta_device_build(letter: str) -> None:
    check_meta_build(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_block_compiles_fullgraph(letter: str) -> None:
    check_compiles_fullgraph(letter)


def test_compile_check_fails_on_a_host_sync() -> None:
    """Negative control: the dropless E block on its reference dispatch, which reads each expert's slice size
    on the host (a data-dependent shape), does not compile fullgraph, and the check says so."""
    from amer.ops import kernels

    with kernels.use("reference"), pytest.raises(GuardOnDataDependentSymNode):
        check_compiles_fullgraph("E")


@pytest.mark.parametrize("letter", LETTERS)
def test_reset_parameters_reinitialises_everything(letter: str) -> None:
    check_reset_parameters(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_meta_build_then_initialise_equals_a_direct_build(letter: str) -> None:
    check_meta_materialise(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_flops_positive_and_growing(letter: str) -> None:
    check_flops(letter)


# ------------------------------------------------------------------------------------------------
# negative controls: a broken family, one fault at a time


@dataclass(frozen=True)
class FaultyConfig:
    fault: str = opt("", "which contract clause the mixer breaks ('' breaks none)")

    def __post_init__(self) -> None:
        known = {*FAULTS, *DOCUMENT_FAULTS}
        check(self.fault in known or self.fault == "", f"faulty.fault must be one of {sorted(known)}")


class FaultyCache(NamedTuple):
    total: Tensor  # (B, D) sum of the values seen so far
    count: int


class FaultyMixer(Mixer):
    """y_t = out(mean of proj(x_s) for s <= t): a causal cumulative mean with an O(1) cache, correct
    unless ``cfg.fault`` names a clause to break."""

    def __init__(self, cfg: FaultyConfig, dims: Any, layer: Any) -> None:
        super().__init__(dims, layer)
        self.fault = cfg.fault
        device = "cpu" if self.fault == "real_tensor" else None  # ignores the ambient (meta) device
        self.proj = nn.Linear(dims.d_model, dims.d_model, bias=False, device=device)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=False)
        self.unused = nn.Parameter(torch.empty(dims.d_model)) if self.fault == "dead_parameter" else None
        # a buffer computed at construction only: on the meta device it never gets values (no init_buffers)
        self.register_buffer("gain", torch.ones(dims.d_model) if self.fault == "buffer_left" else None,
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, 0.0, self.dims.init_std)
        if self.fault != "partial_reset":
            nn.init.normal_(self.out.weight, 0.0, self.dims.init_std)
        else:
            nn.init.normal_(self.out.weight[: self.dims.d_model // 2], 0.0, self.dims.init_std)
        if self.unused is not None:
            nn.init.normal_(self.unused)

    def flops(self, seq_len: int) -> dict[str, float]:
        return {"proj": self.linear_flops(1 if self.fault == "constant_flops" else seq_len)}

    def init_cache(self, batch_size: int, max_len: int, *, device: Any = None, dtype: Any = None) -> FaultyCache:
        return FaultyCache(torch.zeros(batch_size, self.dims.d_model, device=device, dtype=dtype), 0)

    def forward(self, x: Tensor, cache: FaultyCache | None = None, doc_ids: Any = None) -> MixerOutput:
        v = self.proj(x)
        keep = cache is not None and self.fault != "forget_cache"
        total = v.cumsum(1) + (cache.total[:, None] if keep else 0)
        n = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype) + (cache.count if keep else 0)
        if doc_ids is not None and self.fault != "ignore_documents":
            # the running sum restarts at each document: a (T, T) same-document causal matrix of 0/1
            idx = doc_ids.index
            same = (idx[:, :, None] == idx[:, None, :]).tril().to(v.dtype)  # (B, T, T)
            total, n = same @ v, (doc_ids.position + 1).to(x.dtype)
        h = total / n[..., None]
        if self.gain is not None:
            h = h * self.gain
        if self.fault == "leak_future":
            h = h + 0.1 * v.mean(1, keepdim=True)
        if self.fault == "graph_break":
            torch._dynamo.graph_break()
        new = None if cache is None else FaultyCache(total[:, -1], (cache.count if keep else 0) + x.shape[1])
        return MixerOutput(self.out(h), new)


# fault -> the clauses it breaks, and what their failure says (so each fails for the fault's reason)
FAULTS: dict[str, tuple[list[Callable[..., None]], type[Exception], str]] = {
    "leak_future": ([check_causal_mixer, check_causal_model], AssertionError, "changed earlier outputs"),
    "dead_parameter": ([check_gradients_mixer, check_gradients_model], AssertionError, "unused got no gradient"),
    "forget_cache": ([check_prefill_equals_steps, check_split_prefill, check_model_decoding], AssertionError,
                     "not close"),
    "real_tensor": ([check_meta_build], AssertionError, "was allocated on cpu"),
    "graph_break": ([check_compiles_fullgraph], torch._dynamo.exc.Unsupported, "graph_break"),
    "partial_reset": ([check_reset_parameters], AssertionError, "left out.weight"),
    "buffer_left": ([check_meta_materialise], AssertionError, "gain keeps values from before initialisation"),
    "constant_flops": ([check_flops], AssertionError, "does not grow with T"),
}


# faults whose checks live in test_documents.py (the packed-document clauses of the contract)
DOCUMENT_FAULTS = ("ignore_documents",)


@pytest.fixture
def faulty_family():
    spec = register_family(FamilySpec(letter="Z", name="faulty", colour="#000000", config_key="faulty",
                                      config=FaultyConfig, mixer=FaultyMixer, summary="contract negative control"))
    try:
        yield spec
    finally:
        unregister_family("Z")


def test_sound_control_meets_the_contract(faulty_family: FamilySpec) -> None:
    """Without a fault the control family passes every clause, so each failure below is its fault's doing."""
    for clause in CONTRACT:
        clause("Z")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_check_rejects_its_fault(faulty_family: FamilySpec, fault: str) -> None:
    clauses, error, message = FAULTS[fault]
    for clause in clauses:
        with pytest.raises(error, match=message):
            clause("Z", fault=fault)


# ------------------------------------------------------------------------------------------------
# family options that change the computation (what imported checkpoints use), held to the whole contract

OPTION_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("A", {"qkv_bias": True, "out_bias": True, "qk_norm": True, "window": 5, "rope_fraction": 0.5, "scale": 0.3}),
    ("A", {"rope_fraction": 0.0}),
    ("A", {"softcap": 1.5, "window": 5, "qk_norm": True, "qk_norm_scope": "projection", "rope_linear_factor": 4.0}),
    ("A", {"softcap": 2.0, "n_heads": 4, "n_kv_heads": 1}),
    ("D", {"q_lora_rank": 0, "bias": True, "rope": False, "kv_lora_rank": 8}),
    ("D", {"yarn_factor": 4.0, "yarn_original": 8, "yarn_mscale": 0.8, "yarn_mscale_all_dim": 1.0}),
    ("N", {"activation": "none", "output_gate": False, "depth_decay": False, "head_dim": 12}),
    ("A", {"output_gate": True, "qkv_bias": True, "qk_norm": True, "rope_fraction": 0.25}),
    ("E", {"n_experts": 4, "top_k": 1, "renormalize_top1": True, "dispatch": "capacity", "capacity_factor": 4.0}),
    ("E", {"n_experts": 1}),
    ("E", {"n_experts": 1, "activation": "gelu_tanh", "shared_expert": True}),
    ("E", {"n_experts": 1, "activation": "relu2"}),
    ("E", {"n_experts": 1, "activation": "gelu_tanh", "bias": True}),
    ("M", {"bias": True}),
    ("R", {"bias": True, "normalise_first": False}),
    ("H", {"adapter_rank": 0, "act": "silu", "rope": False}),
    ("H", {"n_kv_heads": 4, "adapter_rank": 4, "attention_adapter": True}),
    ("H", {"companion": "mamba1", "adapter_rank": 0}),
]


def _variant_id(v: tuple[str, dict[str, Any]]) -> str:
    return v[0] + ":" + ",".join(f"{k}={val}" for k, val in v[1].items())


@pytest.mark.parametrize("variant", OPTION_VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
def test_option_variants_meet_the_contract(check: Callable[..., None], variant: tuple[str, dict[str, Any]]) -> None:
    letter, options = variant
    check(letter, **options)
