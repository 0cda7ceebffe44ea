"""The ``peers`` suite: amer against Hugging Face transformers at matched configurations.

transformers (and mambapy, its fastest CPU path for Jamba's scan) are optional: ``pip install amer[bench]``;
without them the suite reports why it was skipped instead of failing.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from amer.bench.harness import BenchOptions, SuiteResult, interleave, median, paired_ratio
from amer.bench.workloads import build_model, family_config, make_batch, no_stp, train_step
from amer.config import ModelConfig, from_dict, to_dict
from amer.families import families
from amer.training.compile import compile_blocks

__all__ = ["PeerCase", "peer_cases", "zoo_cases", "suite_peers"]

_HF_CLASSES = ("JambaForCausalLM", "Mamba2ForCausalLM", "MixtralForCausalLM", "Qwen3NextForCausalLM",
               "MambaForCausalLM", "Lfm2ForCausalLM")
# pairs amer imports exactly (amer.interop): the amer side gets the transformers model's own weights, and the
# logits must agree before anything is timed, so the speed ratio compares one computation done two ways
_IMPORTED = ("Mamba2ForCausalLM", "MixtralForCausalLM", "MambaForCausalLM", "Lfm2ForCausalLM")
LOGIT_ATOL = 1e-4  # fp32, for logits up to 1 in size (relative beyond)


def imported_twin(hf: Any, batch: dict[str, Tensor]) -> tuple[Any, float]:
    """The amer model computing what ``hf`` computes (its weights, read back through ``save_pretrained`` and
    :func:`amer.interop.from_transformers`), and the max logit difference on ``batch``; a difference above
    ``LOGIT_ATOL`` is an error: the timings would compare different functions."""
    import tempfile

    from amer.errors import TrainingError
    from amer.interop import from_transformers

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = from_transformers(tmp)
    was = hf.training
    hf.eval()
    with torch.no_grad():
        ref = hf(input_ids=batch["tokens"], use_cache=False).logits.float()
        diff = (model(batch["tokens"], taps=False).logits.float() - ref).abs().max().item()
    hf.train(was)
    if not diff <= LOGIT_ATOL * max(1.0, ref.abs().max().item()):  # relative past |logit| 1: fp32 sums grow with T
        raise TrainingError(f"peers: amer's import of {type(hf).__name__} differs from it by {diff:.3g} in the "
                            f"logits (> {LOGIT_ATOL}); the timings would compare different computations")
    return model.train(), diff


@dataclass
class PeerCase:
    """One side-by-side comparison: an amer model config and a transformers model built to match it."""

    name: str
    hf_class: str
    amer_cfg: ModelConfig
    hf_config: Any
    matched: str


# The second shape: a common language-model size (vocabulary 8,192, width 256, sequence 512), where the LM
# head and the logits weigh as they do in practice; the third a larger one (vocabulary 32,768, width 384, sequence
# 1,024); quick: the tiny preset with a 512-token vocabulary.
SHAPES = ("preset", "large", "xl")


def _base(quick: bool, shape: str) -> ModelConfig:
    base = ModelConfig.from_preset("tiny" if quick else "small")
    if shape == "preset":
        return base
    if quick:
        return family_config(base, base.pattern, vocab_size=512)
    d = to_dict(base)
    V, D = (8192, 256) if shape == "large" else (32768, 384)
    return family_config(base, base.pattern, vocab_size=V, d_model=D, max_seq_len=2048,
                         attention={**d["attention"], "n_heads": 8, "n_kv_heads": 2},
                         mamba={**d["mamba"], "head_dim": 64}, moe={**d["moe"], "d_ff": 2 * D})


def shape_batch(shape: str, opts: BenchOptions) -> tuple[int, int]:
    """(rows, length) of a shape: the same tokens per batch at every shape, longer rows at the larger ones."""
    grow = {"preset": 1, "large": 2, "xl": 4}[shape]
    return max(1, opts.batch // grow), grow * opts.seq_len


def peer_cases(quick: bool, shape: str = "preset") -> list[PeerCase]:
    """Three matched pairs (Jamba-like hybrid, all-Mamba-2, attention + MoE), at the ``small`` preset's
    dimensions (tiny ones with ``quick``), or with ``shape="large"`` at vocabulary 8,192 and width 256.

    Matching rules: same width, vocabulary, heads / kv heads, state size, expert count, top-k and expert
    width; embeddings tied on both sides; no dropout. A transformers *layer* is a mixer plus its
    feed-forward, an amer *letter* is one of them, so ``n`` Jamba / Mixtral layers are ``2n`` letters.
    Jamba's Mamba is Mamba-1 (selective scan, ``dt_rank = ceil(D / 16)``), amer's is Mamba-2, so that
    pair matches dimensions, not the exact mixer; every feed-forward is the MoE
    (``expert_layer_period = 1``) because amer's MoE config is shared by all its blocks.
    """
    from transformers import JambaConfig, Mamba2Config, MixtralConfig

    # each peer is a fixed architecture, so it names the amer families it is matched with (by config key)
    letter = {s.config_key: s.letter for s in families()}
    att_l, mam_l, moe_l = letter["attention"], letter["mamba"], letter["moe"]
    base = _base(quick, shape)
    D, V = base.d_model, base.vocab_size
    att, mam, moe = base.attention, base.mamba, base.moe
    f = moe.d_ff or 2 * D
    n_jamba = 2 if quick else 8  # Jamba layers; attention in every 4th (offset 2) or, quick, the 2nd
    period, offset = (2, 1) if quick else (4, 2)
    jamba_pat = "".join((att_l if i % period == offset else mam_l) + moe_l for i in range(n_jamba))
    n_mix = 2 if quick else 4
    n_m = 2 if quick else 8
    common = {"vocab_size": V, "hidden_size": D, "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2}
    jamba = JambaConfig(**common, num_hidden_layers=n_jamba, num_attention_heads=att.n_heads,
                        num_key_value_heads=att.n_kv_heads, intermediate_size=f, num_experts=moe.n_experts,
                        num_experts_per_tok=moe.top_k, expert_layer_period=1, expert_layer_offset=0,
                        attn_layer_period=period, attn_layer_offset=offset, mamba_d_state=16,
                        mamba_d_conv=mam.d_conv, mamba_expand=mam.expand, mamba_dt_rank=math.ceil(D / 16),
                        use_mamba_kernels=False, use_mambapy=True, max_position_embeddings=base.max_seq_len,
                        use_cache=False)
    mamba2 = Mamba2Config(**common, num_hidden_layers=n_m, state_size=mam.d_state, head_dim=mam.head_dim,
                          num_heads=mam.expand * D // mam.head_dim, expand=mam.expand, n_groups=mam.n_groups,
                          chunk_size=mam.chunk_size, conv_kernel=mam.d_conv, use_cache=False)
    mixtral = MixtralConfig(**common, num_hidden_layers=n_mix, num_attention_heads=att.n_heads,
                            num_key_value_heads=att.n_kv_heads, intermediate_size=f,
                            num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                            max_position_embeddings=base.max_seq_len, use_cache=False)
    jamba_mamba = from_dict(type(mam), {**to_dict(mam), "d_state": 16})
    return [
        PeerCase("jamba-like", "JambaForCausalLM", family_config(base, jamba_pat, mamba=to_dict(jamba_mamba)), jamba,
                 f"{n_jamba} Jamba layers (attention where i % {period} == {offset}, MoE FFN in all), d_state 16; "
                 "HF Mamba-1 scan via mambapy (use_mambapy=True)"),
        PeerCase(f"all-{mam_l}", "Mamba2ForCausalLM", family_config(base, mam_l * n_m), mamba2,
                 f"{n_m} Mamba-2 layers, d_state {mam.d_state}, head_dim {mam.head_dim}, chunk {mam.chunk_size}; "
                 "HF torch_forward (no CUDA kernels)"),
        PeerCase(f"{att_l}+{moe_l}", "MixtralForCausalLM", family_config(base, (att_l + moe_l) * n_mix), mixtral,
                 f"{n_mix} Mixtral layers (GQA {att.n_heads}/{att.n_kv_heads} + {moe.n_experts} experts "
                 f"top-{moe.top_k})"),
    ]


def zoo_cases(quick: bool) -> tuple[list[PeerCase], int, int]:
    """The newer families against the transformers classes that hold them, at one shape: 4 layers, width 256,
    vocabulary 8,192, batch 4 x 512 tokens (quick: width 32, vocabulary 512, 2 x 64), with the (batch, length).

    ``(GE)*4`` vs ``Qwen3NextForCausalLM`` with only gated DeltaNet layers and dense MLPs (its torch path:
    flash-linear-attention absent), matched dimensions (4 key heads, 8 value heads of 64, conv 4, MLP 512),
    separate weights; ``S*4`` vs ``MambaForCausalLM``'s slow path (its default without CUDA kernels: a loop over
    time steps) and, where mambapy is installed, its parallel scan (``use_mambapy=True``); ``(CE)*4`` vs
    ``Lfm2ForCausalLM`` (convolution layers, MLP 512). Mamba and LFM2 run the transformers model's own weights,
    imported."""
    from transformers import Lfm2Config, MambaConfig, Qwen3NextConfig

    D, V, B, T = (32, 512, 2, 64) if quick else (256, 8192, 4, 512)
    n, f, hk = 4, 2 * D, D // 4  # layers, MLP width, DeltaNet head width (4 key heads, 8 value heads)
    letter = {s.config_key: s.letter for s in families()}
    g, s_, c, e = letter["deltanet"], letter["mamba1"], letter["shortconv"], letter["moe"]
    common = {"vocab_size": V, "hidden_size": D, "tie_word_embeddings": True, "num_hidden_layers": n,
              "use_cache": False}
    base = dict(d_model=D, vocab_size=V, max_seq_len=T, moe={"n_experts": 1, "d_ff": f})
    try:
        import mambapy  # noqa: F401
        mambapy_there = True
    except ImportError:
        mambapy_there = False
    qwen = Qwen3NextConfig(**common, intermediate_size=f, layer_types=["linear_attention"] * n,
                           mlp_only_layers=list(range(n)), linear_num_key_heads=4, linear_num_value_heads=8,
                           linear_key_head_dim=hk, linear_value_head_dim=hk, linear_conv_kernel_dim=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=D // 4)
    mamba = {"state_size": 16, "expand": 2, "conv_kernel": 4}
    lfm2 = Lfm2Config(**common, intermediate_size=f, block_auto_adjust_ff_dim=False, layer_types=["conv"] * n,
                      num_attention_heads=4, num_key_value_heads=2, conv_L_cache=3)
    gdn = {"n_k_heads": qwen.linear_num_key_heads, "n_v_heads": qwen.linear_num_value_heads, "head_k_dim": hk,
           "head_v_dim": hk, "d_conv": 4}  # chunk length: each side its own (transformers 64, amer 32)
    cases = [
        PeerCase(f"{g}+{e}", "Qwen3NextForCausalLM", ModelConfig(pattern=f"({g}{e})*{n}", deltanet=gdn, **base), qwen,
                 f"{n} Qwen3-Next layers, all gated DeltaNet ({gdn['n_k_heads']} key / {gdn['n_v_heads']} value heads "
                 f"of {hk}) with dense MLPs ({f}); HF torch_chunk_gated_delta_rule"),
        PeerCase(f"all-{s_}", "MambaForCausalLM", ModelConfig(pattern=f"({s_})*{n}", **base),
                 MambaConfig(**common, **mamba, use_mambapy=False),
                 f"{n} Mamba-1 layers, d_state 16, expand 2; HF's slow path as configured by default (no CUDA kernels, "
                 "use_mambapy=False): its scan loops over time steps"),
        PeerCase(f"{c}+{e}", "Lfm2ForCausalLM", ModelConfig(pattern=f"({c}{e})*{n}", **base), lfm2,
                 f"{n} LFM2 convolution layers (kernel 3) with dense SwiGLU ({f})"),
    ]
    if mambapy_there:  # the fastest CPU path transformers has for Mamba-1: mambapy's parallel scan
        cases.insert(2, PeerCase(f"all-{s_}/mambapy", "MambaForCausalLM", ModelConfig(pattern=f"({s_})*{n}", **base),
                                 MambaConfig(**common, **mamba, use_mambapy=True),
                                 f"{n} Mamba-1 layers as above; HF mambapy's parallel scan (use_mambapy=True)"))
    return cases, B, T


def _hf_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Tensor]) -> Callable[[], None]:
    def run() -> None:  # HF shifts the labels by one itself: T - 1 predictions instead of T, same work
        out = model(input_ids=batch["tokens"], labels=batch["tokens"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def suite_peers(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("peers")
    try:
        import transformers
    except ImportError:
        res.notes.append("skipped: transformers is not installed (pip install 'amer[bench]' for transformers "
                         "and mambapy)")
        return res
    transformers.logging.set_verbosity_error()
    try:
        import mambapy  # noqa: F401
        mambapy_there = True
    except ImportError:
        mambapy_there = False
        res.notes.append("mambapy is not installed: JambaForCausalLM falls back to its sequential scan "
                         "(far slower than its fastest CPU path)")
    cls = {name: getattr(transformers, name) for name in _HF_CLASSES}
    for shape in SHAPES[:2] if opts.quick else SHAPES:  # quick: the larger shapes are the same tiny one
        B, T = shape_batch(shape, opts)
        cases = peer_cases(opts.quick, shape)
        for case in cases:
            if shape == "xl" and case.hf_class == "JambaForCausalLM" and not mambapy_there:
                res.notes.append("jamba-like at xl shape skipped: transformers' Jamba without mambapy loops over "
                                 "time, minutes per step at 1,024 tokens")
                continue
            _compare(case, cls[case.hf_class], B, T, opts, res, shape)
    res.notes.append("training step (forward, backward, AdamW) at the preset's shape, at vocabulary 8,192, width "
                     "256, twice the sequence, and at vocabulary 32,768, width 384, four times the sequence (same "
                     "tokens per batch); speedup = median of per-round (transformers step / amer step), each row "
                     "one sequence on both sides; documents_speedup: amer keeping the batch's packed documents apart "
                     "(its training default; transformers' step does not)"
                     + ("; compiled: amer's blocks regionally compiled (backend "
                        f"{opts.compile_backend or ('aot_eager' if opts.quick else 'inductor')}), first_step_s its "
                        "warm-up" if opts.compile else "")
                     + f"; targets at every shape: {cases[0].name} >= 6, {cases[1].name} >= 1.5"
                     + (" (1.6 compiled)" if opts.compile else "") + f", {cases[2].name} >= 1.3")
    zoo, B, T = zoo_cases(opts.quick)
    for case in zoo:
        _compare(case, cls[case.hf_class], B, T, opts, res, "zoo")
    res.notes.append(f"zoo shape: {zoo[0].amer_cfg.n_layers // 2} layers, width {zoo[0].amer_cfg.d_model}, vocabulary "
                     f"{zoo[0].amer_cfg.vocab_size}, {B} x {T} tokens; target >= 1.5 for each")
    return res


def _compare(case: PeerCase, hf_cls: Any, B: int, T: int, opts: BenchOptions, res: SuiteResult, shape: str) -> None:
    """One pair timed side by side (interleaved rounds), one row and one note."""
    torch.manual_seed(opts.seed)
    hf = hf_cls(case.hf_config).train()
    batch = make_batch(case.amer_cfg.vocab_size, B, T, opts.seed)
    diff = None
    if case.hf_class in _IMPORTED:
        amer_model, diff = imported_twin(hf, batch)
    else:
        amer_model = build_model(case.amer_cfg, opts.seed)
    # the same optimizer on both sides (the training loop's own adds clipping and param groups)
    # what the HF side computes: cross-entropy plus the MoE auxiliary losses, no STP and no clipping
    # "amer" sees each row as one sequence, as transformers does: the same function on both sides. "amer documents"
    # keeps the batch's packed documents apart (its training default), which transformers' step does not do.
    docs_twin = copy.deepcopy(amer_model)
    fns = {"amer": train_step(amer_model, batch, no_stp(amer_model), torch.optim.AdamW(amer_model.parameters(),
                                                                                       lr=1e-4),
                              grad_clip=None, documents=False),
           "amer documents": train_step(docs_twin, batch, no_stp(docs_twin),
                                        torch.optim.AdamW(docs_twin.parameters(), lr=1e-4), grad_clip=None),
           "hf": _hf_step(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), batch)}
    compiled: dict[str, Any] = {}
    if opts.compile:  # a second copy with compiled blocks, timed in the same rounds as eager amer and transformers
        torch._dynamo.reset()  # graphs of the pairs before are not needed again: one case's graphs at a time
        twin = copy.deepcopy(amer_model)
        compile_blocks(twin, backend=opts.compile_backend or ("aot_eager" if opts.quick else "inductor"))
        fns["amer compiled"] = train_step(twin, batch, no_stp(twin), torch.optim.AdamW(twin.parameters(), lr=1e-4),
                                          grad_clip=None, documents=False)
        t0 = time.perf_counter()
        fns["amer compiled"]()
        compiled["first_step_s"] = time.perf_counter() - t0
    times = interleave(fns, opts.repeats, opts.warmup)
    if opts.compile:
        compiled.update(compiled_tok_s=B * T / median(times["amer compiled"]),
                        compiled_speedup=paired_ratio(times["hf"], times["amer compiled"]))
    res.rows.append({
        "name": case.name, "peer": case.hf_class, "pattern": amer_model.cfg.pattern,
        "shape": f"V{case.amer_cfg.vocab_size} D{case.amer_cfg.d_model} {B}x{T}",
        "amer_params": amer_model.num_params(), "hf_params": sum(p.numel() for p in hf.parameters()),
        "amer_tok_s": B * T / median(times["amer"]), "hf_tok_s": B * T / median(times["hf"]),
        "speedup": paired_ratio(times["hf"], times["amer"]),
        "documents_speedup": paired_ratio(times["hf"], times["amer documents"]), **compiled,
        "same_weights": diff is not None, "logits_max_diff": diff,
    })
    res.notes.append(f"{case.name} at {shape} shape: {case.matched}" + (
        f"; amer runs the transformers model's own weights (imported), logits equal to {diff:.1e}"
        if diff is not None else "; matched dimensions, separate random weights"))
