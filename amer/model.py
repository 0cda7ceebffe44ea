"""HybridLM: embeddings -> pattern of A/M/E/R blocks -> final RMSNorm -> LM head.

The layer loop records every block's output as a typed :class:`~amer.tap.Tap` unconditionally;
taps are references to tensors autograd keeps anyway, so recording costs no memory on the
training path. Model code holds no training code: the objective (cross-entropy, the blocks' auxiliary
losses, STP) is assembled by :mod:`amer.objective` from a :class:`ModelOutput`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from amer.blocks import Block, DocIds, RMSNorm, SharedUse, residual_layer
from amer.config import ModelConfig
from amer.generate import generate
from amer.tap import Tap, TapSet, resolve_selector, tap_positions

__all__ = ["HybridLM", "ModelOutput", "HeadInput", "PretrainedIO", "set_pretrained_io", "scale_embedding",
           "final_logits", "InitUnit", "unit_seed", "seeded"]


class PretrainedIO(Protocol):
    """Reads and writes pretrained folders for :class:`HybridLM` (implemented by :mod:`amer.hub`)."""

    def load(self, path: str | Path, *, device: str | torch.device) -> HybridLM: ...

    def save(self, model: HybridLM, directory: str | Path, *, tokenizer: Any) -> Path: ...

    def push(self, model: HybridLM, repo_id: str, *, tokenizer: Any, **hub_kwargs: Any) -> str: ...


_PRETRAINED_IO: list[PretrainedIO] = []


def set_pretrained_io(io: PretrainedIO) -> None:
    """Give :meth:`HybridLM.from_pretrained` / :meth:`~HybridLM.save_pretrained` / :meth:`~HybridLM.push_to_hub`
    their implementation (the last one set wins)."""
    _PRETRAINED_IO[:] = [io]


def _pretrained_io() -> PretrainedIO:
    if not _PRETRAINED_IO:  # only when amer.model was loaded outside the amer package
        raise RuntimeError("pretrained folders need amer.hub: import amer (it registers the reader and writer)")
    return _PRETRAINED_IO[0]


def scale_embedding(cfg: ModelConfig, x: Tensor) -> Tensor:
    """The embedding as the first block sees it (``cfg.embed_scale``: Gemma multiplies by sqrt(d_model))."""
    return x if cfg.embed_scale == 1 else x * cfg.embed_scale


def final_logits(cfg: ModelConfig, logits: Tensor) -> Tensor:
    """The LM head's output scaled (``cfg.logit_scale``) and soft-capped (``cfg.logit_softcap``,
    c * tanh(z / c), Gemma 2 / RecurrentGemma), in the order the source models apply them."""
    if cfg.logit_scale != 1:
        logits = logits * cfg.logit_scale
    if cfg.logit_softcap is not None:
        logits = torch.tanh(logits / cfg.logit_softcap) * cfg.logit_softcap
    return logits


class HeadInput(NamedTuple):
    """What the LM head would turn into logits, for a loss that never holds them all (``head=False``):
    the final normed states, the head weight (the embedding when tied), the logit transform of
    :func:`final_logits`, and the dtype the head's matmul runs in (the autocast dtype, if any)."""

    hidden: Tensor  # (B, T, D)
    weight: Tensor  # (V, D)
    logit_scale: float
    logit_softcap: float | None
    dtype: torch.dtype


class ModelOutput(NamedTuple):
    logits: Tensor | None  # (B, T, V); None when called with head=False
    taps: TapSet | None  # None when called with taps=False
    aux_losses: dict[str, Tensor]  # weighted auxiliary losses summed over blocks, by the names families give them
    stats: dict[str, Tensor]  # detached figures "<key>/<figure>" (mean over the blocks reporting it), then per block
    # "<key>/<figure>/<block>", e.g. "moe/drop_frac" and "moe/drop_frac/E0"
    cache: list[Any] | None = None  # per-block decoding caches when called with a cache
    head: HeadInput | None = None  # with head=False: the head's input instead of the logits


class InitUnit(NamedTuple):
    """One independently seeded part of a model's initialisation: its name (the module's name in the model),
    the module, and what initialises it in place (from torch's global generator)."""

    name: str
    module: nn.Module
    init: Callable[[nn.Module], None]


def _reset(module: nn.Module) -> None:
    module.reset_parameters()


def unit_seed(seed: int, name: str) -> int:
    """The seed of initialisation unit ``name`` of a model initialised with ``seed``: a hash of both, so it does
    not depend on the order in which units are built or on which of them a process holds."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's generators (the CPU one, and ``device``'s) seeded for unit ``name``, and
    restore them afterwards."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(unit_seed(seed, name))
        yield


class HybridLM(nn.Module):
    """A language model whose block stack is given by ``cfg.pattern``.

    ``model(tokens)`` -> :class:`ModelOutput`. ``taps=True`` (default) records all taps,
    ``taps=False`` none, a selector string (or the tap positions it resolves to) only those it names
    (inference memory stays flat).
    ``head=False`` skips the LM head and returns its input (:class:`HeadInput`) in ``out.head``, so a
    training loss can fuse head and cross-entropy (:mod:`amer.ops.linear_ce`) without the logits.
    ``model(tokens, doc_ids=ids)`` runs packed rows: ``ids`` (B, T) names each token's document and no
    block sees across a change of id (see :mod:`amer.blocks.doc_ids`), so each document gets the
    outputs it has alone.
    Decoding: ``cache = model.init_cache(B, max_len)``, then ``model(tokens, cache=cache)`` repeatedly;
    attention keeps a KV cache, Mamba and recurrent blocks an O(1) state.

    Initialisation: ``HybridLM(cfg, seed=s)`` initialises each unit (the embedding, every block with its own
    ``reset_parameters``, the final norm, an untied head) on the seed ``unit_seed(s, name)``, so a process that
    builds only some units (a pipeline stage, a shard) gives them exactly these weights; without ``seed`` one is
    drawn from torch's generator. Under ``torch.device("meta")`` nothing is allocated or initialised.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.pattern = cfg.parsed
        self._tap_where = tap_positions(self.pattern)  # once per model, not once per forward
        device = torch.get_default_device()
        # Built on the meta device, then given memory once and initialised unit by unit (init_weights): the
        # weights depend on the seed and the units' names only, never on what was built before them, so a
        # process that builds one pipeline stage or one shard initialises it exactly as this model is.
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            dims = cfg.dims
            shared: dict[str, Block] = {}  # a shared block: built for its first use, held once (amer.blocks.shared)
            blocks: list[nn.Module] = []
            def build(layer: Any) -> Block:
                return Block(cfg.layer_config(layer), dims, layer, cfg.block_options(layer),
                             companion=cfg.companion_config(layer))

            for layer in self.pattern.layers:
                if layer.share is not None and layer.share not in shared:
                    # with a norm of its own even if its first use is a parallel branch
                    shared[layer.share] = build(replace(layer, branch=None)).without_per_use()
                if layer.share is not None:  # a use's own submodules (the mixer's per_use) come from its own build
                    per_use = build(layer).per_use_parts() if shared[layer.share].mixer.per_use else None
                    blocks.append(SharedUse(shared[layer.share], layer, per_use))
                else:
                    blocks.append(build(layer))
            self.blocks = nn.ModuleList(blocks)
            self.reads_embedding = any(blk.mixer.reads_embedding for blk in blocks)
            self.shared = nn.ModuleDict(shared)
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if device.type == "meta":  # HybridLM.empty, or a caller sizing or sharding the model before it exists
            return
        self.to_empty(device=device)
        if cfg.tie_embeddings:  # to_empty gives each module its own tensor
            self.lm_head.weight = self.embed.weight
        self.init_buffers(device)
        self.init_weights(seed)

    def init_units(self) -> list[InitUnit]:
        """The model's initialisation units, each initialised on its own seed (:func:`unit_seed`): the embedding,
        every block (its own :meth:`~amer.blocks.Block.reset_parameters`), the final norm and an untied head.
        A tied head is the embedding."""
        units = [InitUnit("embed", self.embed, self._normal)]
        units += [InitUnit(f"blocks.{i}", blk, _reset) for i, blk in enumerate(self.blocks)
                  if not isinstance(blk, SharedUse) or blk.parts is not None]
        units += [InitUnit(f"shared.{name}", blk, _reset) for name, blk in self.shared.items()]
        units.append(InitUnit("norm", self.norm, _reset))
        if not self.cfg.tie_embeddings:
            units.append(InitUnit("lm_head", self.lm_head, self._normal))
        return units

    def _normal(self, module: nn.Module) -> None:
        """GPT-2 style embedding and head: N(0, init_std)."""
        nn.init.normal_(module.weight, 0.0, self.cfg.init_std)

    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every weight, unit by unit, each unit on the seed ``unit_seed(seed, name)``; ``seed`` None
        draws one from torch's global generator (so ``torch.manual_seed(s); HybridLM(cfg)`` is reproducible)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        for unit in self.init_units():
            with seeded(seed, unit.name, self.embed.weight.device):
                unit.init(unit.module)

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute the buffers that weights do not carry (RoPE frequencies) on ``device``."""
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers(device)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-initialise every weight (:meth:`init_weights`)."""
        self.init_weights(seed)

    @classmethod
    def empty(cls, cfg: ModelConfig) -> HybridLM:
        """The model's structure on the meta device: no memory and no initialisation; :meth:`assign` gives it
        weights."""
        with torch.device("meta"):
            return cls(cfg)

    def assign(self, state: dict[str, Tensor]) -> HybridLM:
        """Take ``state``'s tensors as the weights themselves (no copy; they keep their dtype and device),
        compute the buffers weights do not carry (RoPE frequencies) and re-tie a tied head. After
        :meth:`empty` this loads a model at the memory of one copy of its weights, not two. ``state`` must hold
        every weight at its shape (strict; a tied head may be left out)."""
        if self.cfg.tie_embeddings and "embed.weight" in state:  # a stored copy of a tied head is not read
            state = {**state, "lm_head.weight": state["embed.weight"]}
        self.load_state_dict(state, strict=True, assign=True)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_buffers(self.embed.weight.device)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:  # a module with an unsaved buffer must compute it in init_buffers(device)
            raise RuntimeError(f"assign() left {left[0]!r} without data: its module has no init_buffers()")
        return self

    # Pretrained folders are a file format and the model knows none: amer.hub hands these three methods
    # their implementation (set_pretrained_io) when the package is imported.

    def save_pretrained(self, directory: str | Path, *, tokenizer: Any = None, push_to_hub: bool = False,
                        repo_id: str | None = None, **hub_kwargs: Any) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) to ``directory`` (see
        :mod:`amer.hub`); ``push_to_hub=True`` also uploads them to ``repo_id`` (default: the folder's name)."""
        out = _pretrained_io().save(self, directory, tokenizer=tokenizer)
        if push_to_hub:
            _pretrained_io().push(self, repo_id or Path(directory).name, tokenizer=tokenizer, **hub_kwargs)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> HybridLM:
        """The model saved by :meth:`save_pretrained` (a local folder, or a Hub ``owner/name`` when no such local
        path exists), in eval mode. Its tokenizer: ``amer.data.load_tokenizer(path)``."""
        return _pretrained_io().load(path, device=device)

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None, **hub_kwargs: Any) -> str:
        """Upload the pretrained folder to the Hub repository ``repo_id`` (needs a network and a token)."""
        return _pretrained_io().push(self, repo_id, tokenizer=tokenizer, **hub_kwargs)

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> list[Any]:
        """Fresh decoding caches for every block (None for blocks that keep no state)."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return [blk.init_cache(batch_size, max_len, device=device, dtype=dtype) for blk in self.blocks]

    def forward(self, tokens: Tensor, *, taps: bool | str | Sequence[int] = True, cache: list[Any] | None = None,
                doc_ids: Tensor | None = None, head: bool = True) -> ModelOutput:
        B, T = tokens.shape
        docs = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids describe packed training rows; decoding with a cache runs one document")
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must match tokens {tuple(tokens.shape)}")
            docs = DocIds(doc_ids)
        L = len(self.blocks)
        if taps is True:
            keep = None  # every position
        elif taps is False:
            keep = set()
        elif isinstance(taps, str):
            keep = set(resolve_selector(taps, self.pattern))
        else:  # tap positions, as resolve_selector returns them (a caller that resolved its selector once)
            keep = set(taps)
        recorded: list[Tap] = []
        positions: list[int] = []

        def record(pos: int, tap: Tap) -> None:
            if keep is None or pos in keep:
                recorded.append(tap)
                positions.append(pos)

        x = scale_embedding(self.cfg, self.embed(tokens))  # (B, T, D)
        embed = x if self.reads_embedding else None  # for mixers that read it (Zamba's shared transformer)
        record(0, Tap(-1, None, 0, x, "embed"))
        aux: dict[str, Tensor] = {}
        stats: dict[str, list[tuple[str, Tensor]]] = {}
        new_cache: list[Any] | None = [] if cache is not None else None
        where = self._tap_where
        for specs in self.pattern.residual_layers:
            idx = [spec.index for spec in specs]
            caches = [None] * len(idx) if cache is None else [cache[i] for i in idx]
            x, branch_taps, outs = residual_layer([self.blocks[i] for i in idx], x, caches, docs, embed)
            for spec, hid in zip(specs, branch_taps):
                record(where.block[spec.index], Tap(spec.index, spec.family, spec.family_index, hid, "branch"))
            last = specs[-1]
            if branch_taps:
                record(where.layer[last.depth], Tap(last.index, None, 0, x, "layer", "+".join(s.name for s in specs)))
            else:
                record(where.block[last.index], Tap(last.index, last.family, last.family_index, x))
            for spec, out in zip(specs, outs):
                for k, v in out.aux.items():
                    aux[k] = aux[k] + v if k in aux else v
                for k, v in out.stats.items():
                    stats.setdefault(k, []).append((spec.name, v))
                if new_cache is not None:
                    new_cache.append(out.cache)
        h = self.norm(x)  # (B, T, D)
        record(where.final, Tap(L, None, 0, h, "final"))
        logits, head_in = None, None
        if head:
            logits = final_logits(self.cfg, self.lm_head(h))  # (B, T, V)
        else:
            kind = h.device.type
            dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
            head_in = HeadInput(h, self.lm_head.weight, self.cfg.logit_scale, self.cfg.logit_softcap, dt)
        flat_stats: dict[str, Tensor] = {}
        for k, vs in stats.items():  # the mean over the blocks that report k, then each block's own
            flat_stats[k] = torch.stack([v.float() for _, v in vs]).mean()
        for k, vs in stats.items():
            for name, v in vs:
                flat_stats[f"{k}/{name}"] = v
        tapset = None if taps is False else TapSet(recorded, self.pattern, positions)
        return ModelOutput(logits, tapset, aux, flat_stats, new_cache, head_in)

    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_id: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, T0) with the decoding caches (O(1)/token for M, R);
        see :func:`amer.generate.generate`."""
        return generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                        eos_id=eos_id)
