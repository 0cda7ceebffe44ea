"""Benchmarks: ``amer bench SUITE``.

Suites (``all`` runs every one):

``blocks``   forward+backward tokens/s of single-family stacks (one per registered family: ``AAAA``,
             ``MMMM``...) at the ``small`` preset's dimensions, and of the ``small`` preset itself, at batch
             8 x 256 tokens.
``stp``      training-step time (forward, backward, clip, AdamW) of the ``small`` preset with STP on the last
             block of each family (``A-1,M-1,...``) at ``n_spans`` 1, 4, 16, divided by the same step
             without STP.
``taps``     peak tensor memory and step time, taps recorded (``taps=True``) vs none (``taps=False``).
``scaling``  tokens/s and peak memory vs sequence length 256..4096 per family, and decoding latency per token
             vs context length (constant for the state-space, recurrent and MoE stacks; growing for
             attention, whose KV cache grows).
``flops``    achieved FLOP/s of the ``small`` preset's training step (matmul FLOPs counted from the model's
             structure, see :func:`training_flops`) divided by a large fp32 matmul's FLOP/s measured in the
             same run.
``packing``  training-step time of the ``small`` preset with packed documents kept apart (``--packing
             documents``: attention mask, state and convolution resets) divided by the same step run across
             document boundaries (``--packing none``), at sequence length 256 and 2048.
``lmhead``   peak memory and step time of the plain LM head + cross-entropy vs the fused, chunked one
             (:mod:`amer.ops.linear_ce`) at vocabulary 32,768 and sequence 2,048.
``checkpointing``  peak memory and step time per ``--activation-checkpointing`` setting (none, blocks,
             selective) of the ``small`` preset at sequence 4,096.
``compiled`` training-step time of the ``small`` preset with its blocks regionally compiled
             (``torch.compile``, fullgraph, one graph per block variant) vs eager, and the compile time; with
             the dropless MoE (on grouped GEMM) and with the capacity dispatch.
``decode``   greedy decoding tokens/s at batch 1 and 16, amer's caches vs transformers' ``generate()``
             (Mixtral, Mamba2) on the same imported weights, continuations compared.
``peers``    amer vs Hugging Face transformers (``JambaForCausalLM`` with ``use_mambapy=True``,
             ``Mamba2ForCausalLM``, ``MixtralForCausalLM``) at matched configurations, parameter counts side
             by side, at the preset's shape and at vocabulary 8,192 / width 256 / sequence 512; and the G, S and C
             families vs ``Qwen3NextForCausalLM``, ``MambaForCausalLM`` (slow path, and mambapy's scan where
             installed) and ``Lfm2ForCausalLM`` at 4 layers, width 256, 4 x 512 tokens; skipped with a message
             when transformers is not installed (``pip install amer[bench]``).
``gpu``      the training step of ``small`` and the ~350M ``m350`` preset on one CUDA device, kernels
             (mamba-ssm, causal-conv1d, grouped GEMM, flash / flex attention) vs the pure-torch references:
             tokens/s, MFU, peak memory, the backend of each op (skipped with a message without CUDA).
``plan``     ``amer plan``'s per-rank peak memory beside the peak measured on CPU runs of eight layouts (one
             process, activation checkpointing, FSDP2, DDP, experts over ranks, 1F1B, GPipe, dp x pp), each in
             its own ``torchrun`` processes (see :mod:`amer.bench.plan_check`).
``construction``  each rank's peak host memory while it builds its share of a 295 MB model: one process, two
             pipeline stages, FSDP2 over two ranks, experts over two ranks.
``xla``      the training step on the XLA device vs eager CPU: time to the first step, steady step time, graphs
             compiled in warm-up and after it (torch_xla; skipped with a message when it is not installed).

Every suite times :class:`amer.training.step.TrainStep`, the step ``amer train`` runs. How figures are
taken on a noisy machine is in :mod:`amer.bench.harness`; the command line is :mod:`amer.cli.bench`.
"""

from __future__ import annotations

from collections.abc import Callable

from amer.bench.compiled import suite_compile
from amer.bench.decode import suite_decode
from amer.bench.flops import forward_macs, training_flops
from amer.bench.gpu import suite_gpu
from amer.bench.harness import (
    BenchOptions,
    SuiteResult,
    format_table,
    interleave,
    machine_info,
    median,
    paired_ratio,
    peak_tensor_bytes,
)
from amer.bench.memory import suite_checkpointing, suite_lmhead
from amer.bench.peers import suite_peers
from amer.bench.plan_check import suite_construction, suite_plan
from amer.bench.suites import suite_blocks, suite_flops, suite_packing, suite_scaling, suite_stp, suite_taps
from amer.bench.xla_suite import suite_xla
from amer.config import suggest
from amer.errors import ConfigError

__all__ = [
    "SUITES", "BenchOptions", "SuiteResult", "interleave", "paired_ratio", "median", "peak_tensor_bytes",
    "machine_info", "forward_macs", "training_flops", "select_suites", "run_suite", "format_table",
]

_SUITE_FNS: dict[str, Callable[[BenchOptions], SuiteResult]] = {
    "blocks": suite_blocks,
    "stp": suite_stp,
    "taps": suite_taps,
    "scaling": suite_scaling,
    "flops": suite_flops,
    "packing": suite_packing,
    "lmhead": suite_lmhead,
    "checkpointing": suite_checkpointing,
    "compiled": suite_compile,
    "decode": suite_decode,
    "peers": suite_peers,
    "xla": suite_xla,
    "gpu": suite_gpu,
    "plan": suite_plan,
    "construction": suite_construction,
}
SUITES = tuple(_SUITE_FNS)
ALIASES = {"compile": "compiled"}  # the suite's name before it was renamed


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown benchmark suite {name!r}{suggest(name, [*SUITES, 'all'])} "
                       f"(accepted: {', '.join(SUITES)}, all)")


def select_suites(specs: list[str]) -> list[str]:
    """Suite names from command-line words (``blocks``, ``stp,taps``, ``all``), each once, in order given."""
    names: list[str] = []
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if part == "all":
                names += [n for n in SUITES if n not in names]
            elif part in SUITES or part in ALIASES:
                part = ALIASES.get(part, part)
                names += [part] if part not in names else []
            else:
                raise _unknown(part)
    return names


def run_suite(name: str, opts: BenchOptions) -> SuiteResult:
    """Run one suite by name (one of :data:`SUITES`)."""
    name = ALIASES.get(name, name)
    if name not in _SUITE_FNS:
        raise _unknown(name)
    return _SUITE_FNS[name](opts)
