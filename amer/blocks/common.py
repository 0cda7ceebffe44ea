"""Shared pieces of every block: RMSNorm, SwiGLU and other feed-forwards, the mixer contract and the pre-norm
wrapper.

The mixer contract (uniform across families, as in flash-linear-attention)::

    mixer = MixerCls(cfg, dims: Dims, layer: LayerSpec)   # cfg: the family's own config
    out = mixer(x, cache=None)          # x: (B, T, D) -> MixerOutput(y (B, T, D), cache, aux, stats)
    out = mixer(x, doc_ids=DocIds(ids)) # packed rows: no state, window or attention crosses a document
    cache = mixer.init_cache(batch_size, max_len, device=..., dtype=...)
    out = mixer(x, cache=cache)         # continue from the cache (prefill T > 1 or a step T == 1)
    mixer.reset_parameters()            # the family's own initialisation (called by __init__)
    mixer.flops(seq_len)                # forward matmul multiply-adds per sequence, by term
    mixer.aux_losses                    # {aux loss name: the setting that weights it}, for the guard
    mixer.fullgraph_blocker()           # None, or why its training forward cannot compile fullgraph
    mixer.device_note("xla")            # None, or what it does differently on that device (said once)
    mixer.after_step()                  # after each optimizer step: training state outside the parameters
    out = mixer(x, embed=e)             # reads_embedding: also given the embedding output e (B, T, D)
    out = mixer(x, parts=use.parts)     # per_use: a shared block's use's own submodules

``cache=None`` is the training path: no state is kept and ``out.cache`` is None. With a cache, the
mixer consumes T new tokens after those the cache has seen and returns the updated cache (caches
are NamedTuples; they are returned, not mutated, except for preallocated KV buffers).

``doc_ids`` (:class:`~amer.blocks.doc_ids.DocIds`, training path only) describes packed rows:
a mixer gives every document the outputs it would have alone in a row (token-wise mixers need only
keep padding out of their statistics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.model_config import BlockOptions
from amer.ops.activation import activation
from amer.ops.fused import rms_norm
from amer.pattern import LayerSpec

__all__ = ["time_step_bias_", "RMSNorm", "SwiGLU", "FeedForward", "MixerOutput", "Mixer", "Block"]


class MixerOutput(NamedTuple):
    y: Tensor  # (B, T, D) the mixer's contribution to the residual stream
    cache: Any = None  # updated decoding cache, None on the training path
    aux: dict[str, Tensor] = {}  # auxiliary losses to add to the objective (already weighted), named by the family
    stats: dict[str, Tensor] = {}  # detached figures for logging, "<family key>/<figure>"


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for low-precision safety.

    The gain is ``offset + weight``: ``offset`` 1 is Gemma's ``(1 + w)`` parametrisation (weights stored
    around 0, so weight decay pulls the gain towards 1); the gain starts at 1 either way."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight if self.offset == 0 else self.weight + self.offset, self.eps)


class FeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated, gate and up fused in ``gate_up``) or ``down(act(up(x)))`` (ungated:
    ``gate_up`` is the up projection), ``act`` one of :data:`amer.ops.activation.ACTIVATIONS`; ``silu`` is
    :class:`SwiGLU`."""

    def __init__(self, d_model: int, d_ff: int, act: str = "silu", *, std: float = 0.02,
                 out_std: float = 0.02) -> None:
        super().__init__()
        self.std, self.out_std = std, out_std
        self.act = activation(act)
        self.gate_up = nn.Linear(d_model, (2 if self.act.gated else 1) * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, std); ``down`` writes into the residual stream, so it gets the residual-scaled ``out_std``."""
        nn.init.normal_(self.gate_up.weight, 0.0, self.std)
        nn.init.normal_(self.down.weight, 0.0, self.out_std)

    def forward(self, x: Tensor) -> Tensor:
        if not self.act.gated:
            return self.down(self.act.fn(self.gate_up(x)))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act.fn(gate) * up)


class SwiGLU(FeedForward):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up fused; the gated
    :class:`FeedForward` with ``silu``."""

    def __init__(self, d_model: int, d_ff: int, *, std: float = 0.02, out_std: float = 0.02) -> None:
        super().__init__(d_model, d_ff, "silu", std=std, out_std=out_std)


class Mixer(nn.Module):
    """Base of every family's mixer: keeps ``dims`` and ``layer`` and states the contract above.

    A subclass builds its parameters in ``__init__`` and then calls ``self.reset_parameters()``, so a
    mixer is initialised the same way standalone and inside :class:`~amer.model.HybridLM`.

    What the rest of amer needs to know about a family it learns from here, never by naming the family:
    ``aux_losses`` (the training guard names the setting to lower when one is non-finite),
    :meth:`fullgraph_blocker` (regional compilation), :meth:`device_note` (device runners) and
    :meth:`after_step` (the optimizer).
    """

    #: Every auxiliary loss the mixer puts in ``MixerOutput.aux``, with the setting that weights it.
    aux_losses: ClassVar[Mapping[str, str]] = {}
    #: True: ``forward`` takes ``embed=`` (B, T, D), the embedding output, which the model then passes.
    reads_embedding: ClassVar[bool] = False
    #: True: the mixer norms its input itself; its block adds ``mixer(x)`` to the raw stream ``x``.
    owns_norm: ClassVar[bool] = False
    #: True: on packed documents the mixer reads ``doc_ids.attention_mask`` (built once per forward and shared).
    document_mask: ClassVar[bool] = False
    #: Submodules that belong to each use of a shared block (``A:z``), not to the shared parameters: ``forward``
    #: then takes ``parts=`` (a mapping of those names to the use's own modules).
    per_use: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dims: Dims, layer: LayerSpec) -> None:
        super().__init__()
        self.dims = dims
        self.layer = layer

    def reads_document_mask(self, T: int, device: torch.device) -> bool:
        """Whether a packed forward of ``T`` tokens on ``device`` reads ``doc_ids.attention_mask``: compiled blocks
        have it built ahead of them only then (:meth:`DocIds.prepare`)."""
        return self.document_mask

    def reset_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must initialise its parameters")

    def flops(self, seq_len: int) -> dict[str, float]:
        """Forward matmul multiply-adds for one sequence of ``seq_len`` tokens, by term (``proj``...)."""
        raise NotImplementedError(f"{type(self).__name__} must count its matmul work")

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        """Decoding state; stateless mixers keep none."""
        return None

    def fullgraph_blocker(self) -> str | None:
        """None when the training forward compiles with ``fullgraph=True``; otherwise why not (the block then
        stays eager under regional compilation)."""
        return None

    def device_note(self, device_type: str) -> str | None:
        """What this mixer does differently on ``device_type`` ("xla", "cuda"...), said once per run; None."""
        return None

    def after_step(self) -> None:
        """Called after each optimizer step (the optimizer of :func:`amer.training.optim.make_optimizer` calls it):
        training state a mixer keeps outside its parameters, e.g. the E family's auxiliary-loss-free expert bias.
        Nothing by default."""

    def linear_flops(self, seq_len: int) -> float:
        """Multiply-adds of every ``nn.Linear`` in the mixer over ``seq_len`` tokens (weights as operands)."""
        return float(seq_len * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)))


class Block(nn.Module):
    """One letter of the pattern: ``x = x + mixer(norm(x))`` (Megatron-Core hybrid convention), the update
    multiplied by ``dims.residual_scale`` when that is not 1 (Granite). ``opts.norm_placement`` moves the norm:
    ``post`` is ``x + norm(mixer(x))`` (OLMo 2), ``sandwich`` is ``x + post_norm(mixer(norm(x)))`` (Gemma 2/3).
    ``opts.residual_multiplier`` and ``opts.update_multiplier`` weight the two terms, ``opts.input_multiplier`` the
    mixer's input, and ``opts.residual_normed`` makes the residual the normed input (MiniMax:
    ``alpha * norm(x) + beta * mixer(norm(x))``).

    A branch of a parallel layer (``layer.branch`` set) other than the first has no norm of its own: the layer's
    one pre-norm is its first branch's, and :func:`amer.blocks.parallel.parallel_layer` runs the branches through
    :meth:`update`."""

    def __init__(self, cfg: Any, dims: Dims, layer: LayerSpec, opts: BlockOptions | None = None, *,
                 companion: Any = None) -> None:
        super().__init__()
        opts = opts or BlockOptions()
        placement = opts.norm_placement
        self.layer = layer
        mixer_cls = layer.family.spec.mixer
        own_norm = placement != "post" and not layer.branch and not mixer_cls.owns_norm
        self.norm = RMSNorm(dims.d_model, dims.norm_eps, dims.norm_offset) if own_norm else None
        self.post_norm = (RMSNorm(dims.d_model, dims.norm_eps, dims.norm_offset)
                          if placement != "pre" and not mixer_cls.owns_norm else None)
        self.residual_scale = dims.residual_scale * opts.update_multiplier  # one multiply of the update, or none
        self.residual_multiplier = opts.residual_multiplier
        self.residual_normed = opts.residual_normed
        self.input_multiplier = opts.input_multiplier
        self.mixer = (mixer_cls(cfg, dims, layer) if layer.family.spec.companion is None
                      else mixer_cls(cfg, dims, layer, companion=companion))

    def reset_parameters(self) -> None:
        for norm in (self.norm, self.post_norm):
            if norm is not None:
                norm.reset_parameters()
        self.mixer.reset_parameters()

    def without_per_use(self) -> Block:
        """This block as the shared parameters of a shared block: its mixer's per-use submodules taken out."""
        for name in self.mixer.per_use:
            setattr(self.mixer, name, None)
        return self

    def per_use_parts(self) -> nn.ModuleDict:
        """The mixer's per-use submodules (``Mixer.per_use``), for one use of a shared block."""
        return nn.ModuleDict({n: m for n in self.mixer.per_use if (m := getattr(self.mixer, n)) is not None})

    def update(self, h: Tensor, cache: Any = None, doc_ids: DocIds | None = None, embed: Tensor | None = None,
               parts: nn.ModuleDict | None = None) -> tuple[Tensor, MixerOutput]:
        """What the block adds to the residual stream, given its normed input ``h``, and the mixer's output
        (``embed``: the embedding output, for a mixer that reads it; ``parts``: a shared block's use's own modules)."""
        extra: dict[str, Any] = {}
        if embed is not None and self.mixer.reads_embedding:
            extra["embed"] = embed
        if parts is not None:
            extra["parts"] = parts
        out = self.mixer(h if self.input_multiplier == 1 else h * self.input_multiplier, cache=cache,
                         doc_ids=doc_ids, **extra)
        y = out.y if self.post_norm is None else self.post_norm(out.y)
        return (y if self.residual_scale == 1 else y * self.residual_scale), out

    def forward(self, x: Tensor, cache: Any = None, doc_ids: DocIds | None = None, embed: Tensor | None = None,
                parts: nn.ModuleDict | None = None) -> tuple[Tensor, MixerOutput]:
        h = x if self.norm is None else self.norm(x)
        y, out = self.update(h, cache, doc_ids, embed, parts)
        res = h if self.residual_normed else x
        if self.residual_multiplier != 1:
            res = res * self.residual_multiplier
        return res + y, out

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        return self.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype)


@torch.no_grad()
def time_step_bias_(bias: Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """Mamba's time-step initialisation (Gu & Dao 2023, kept by Mamba-2 and gated DeltaNet): ``dt`` log-uniform in
    ``[dt_min, dt_max]``, floored, stored in ``bias`` as its inverse softplus, so ``softplus(bias)`` starts at
    time steps that span short and long memories."""
    u = torch.rand(bias.shape, device=bias.device, dtype=bias.dtype)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
