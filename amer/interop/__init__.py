"""Pretrained transformers checkpoints in, hybrids out (and back).

``from_transformers(path)`` reads a transformers model folder from disk (``config.json`` and
safetensors; the ``transformers`` package is not needed) and returns an amer :class:`~amer.model.HybridLM`
computing the same function, with the pattern derived from the source's layer layout (Llama ->
``(AE)*L``, Mamba-2 -> ``M*L``, hybrids from their layer-type lists). Whatever a source does that
amer's defaults do not (biases, sliding windows, partial rotary, multipliers...) is an option of a
family config or of :class:`~amer.config.ModelConfig`, so the imported model trains, decodes and packs
documents like any other amer model. ``import_pretrained`` writes it as an amer pretrained folder, and
``pattern=`` performs hybrid surgery (:mod:`amer.interop.surgery`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from amer.config import ModelConfig
from amer.errors import AmerError, ConfigError, InputError
from amer.interop import (  # noqa: F401  (register their converters)
    deepseek,
    falcon_h1,
    gemma,
    gemma2,
    hybrid,
    jamba,
    kimi,
    lara,
    lfm2,
    lfm2_moe,
    lfm3,
    llama,
    minimax,
    moe,
    olmo,
    qwen_next,
    ssm,
    zamba,
    zamba2,
)
from amer.interop.common import CONVERTERS
from amer.interop.source import Source, first_line, unsupported
from amer.model import HybridLM
from amer.weights import check_finite

__all__ = ["from_transformers", "import_pretrained", "supported_classes", "export_transformers", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def supported_classes() -> list[str]:
    return sorted(CONVERTERS)


def from_transformers(path: str | Path, *, dtype: str | torch.dtype = torch.float32) -> tuple[HybridLM, ModelConfig]:
    """The amer model (eval mode) and config equivalent to the transformers checkpoint at ``path``."""
    src = Source(path)
    conv = CONVERTERS.get(src.arch)
    if conv is None:
        raise unsupported(src.arch, f"no converter for this class (supported: {', '.join(supported_classes())})")
    try:
        converted = conv(src)
    except ConfigError as err:  # a setting the config maps to that amer refuses: name the class it came from
        raise unsupported(src.arch, f"its config gives {first_line(err)}") from None
    except AmerError:
        raise
    except KeyError as err:
        raise unsupported(src.arch, f"config.json lacks {err.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, RuntimeError) as err:  # a value
        # of the wrong kind (null where a size belongs, a number where a table belongs, a size the weights do not
        # have...): one line, whatever the converter tripped on; running out of memory is not the config's fault
        if isinstance(err, torch.OutOfMemoryError) or "allocate" in str(err):
            raise
        raise unsupported(src.arch, f"config.json holds a value amer cannot read ({first_line(err)})") from None
    src.check_all_used()
    cfg = converted.config
    model = _load(cfg, converted.state, src.arch)
    check_finite(dict(model.named_parameters()), str(src.root), "the source checkpoint is damaged")
    return model.to(_dtype(dtype)).eval(), cfg


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (accepted: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _load(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> HybridLM:
    """The model made of the converted tensors themselves (assigned, not copied into a second model: the
    import peaks at one copy of the weights); a missing, extra or misshapen tensor is the converter's or the
    source's fault and is named."""
    model = HybridLM.empty(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        name = (missing or extra)[0]
        raise unsupported(arch, f"{'no source weight for' if missing else 'no amer parameter for'} {name!r}")
    for name, t in own.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise unsupported(arch, f"{name}: source shape {tuple(state[name].shape)} != amer's {tuple(t.shape)}")
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # assign() ties it
    return model.assign(_own_storage(state))


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor contiguous in a storage of its own: a converter may hand out slices of one source tensor,
    and weights that share memory cannot be saved as safetensors (nor should one parameter's update move
    another)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def import_pretrained(path: str | Path, out: str | Path, *, pattern: str | None = None,
                      dtype: str = "float32", seed: int = 0,
                      family_configs: dict[str, Any] | None = None) -> tuple[HybridLM, ModelConfig, dict[str, Any]]:
    """Import ``path`` and write it to ``out`` as an amer pretrained folder (with the source's tokenizer.json
    when it has one). ``pattern`` re-shapes the stack first (see :mod:`amer.interop.surgery`; ``family_configs``
    configure the families it brings in). Returns the
    model, its config and a summary (kept / fresh blocks)."""
    from amer.hub import save_pretrained
    from amer.interop.surgery import replace_pattern

    model, cfg = from_transformers(path, dtype=torch.float32)
    src = Source(path)
    src_root = src.root
    summary: dict[str, Any] = {"source_class": src.arch, "pattern": cfg.pattern, "kept": [], "fresh": []}
    if pattern is not None:
        model, cfg, kept, fresh = replace_pattern(model, pattern, seed=seed, **(family_configs or {}))
        summary.update(pattern=cfg.pattern, kept=kept, fresh=fresh)
    model = model.to(_dtype(dtype))
    tokenizer = None
    from amer.data import tokenizer_from_file
    from amer.data.chat_template import read_chat_template

    if (src_root / "tokenizer.json").is_file():
        tokenizer = tokenizer_from_file(src_root / "tokenizer.json")
    template = read_chat_template(src_root)  # an instruction-tuned model's chat template travels with its tokenizer
    summary["chat_template"] = template is not None
    save_pretrained(model, out, tokenizer=tokenizer, chat_template=template,
                    source={"transformers_class": summary["source_class"], "path": str(src_root)})
    return model, cfg, summary


def export_transformers(model: HybridLM, cfg: ModelConfig, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` as a transformers folder (see :mod:`amer.interop.export`)."""
    from amer.interop.export import export_transformers as _export

    return _export(model, cfg, directory, tokenizer)
