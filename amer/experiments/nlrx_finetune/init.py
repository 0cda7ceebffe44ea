"""The model ``--init`` names, with its tokenizer and chat template: an amer checkpoint, run directory or
pretrained folder (imported with ``amer import`` or written by ``save_pretrained``), or a transformers model
folder (Llama, Qwen2/3, Mistral..., converted in memory with identical logits).

The chat data are laid out for that model's tokenizer: with its own chat template where the folder has one
(``chat_template.jinja`` or ``tokenizer_config.json``, see :mod:`amer.data.chat_template`), amer's template
otherwise or when asked (``--chat-template amer``). A model whose embedding is smaller than the ids the data
use is refused; a tokenizer PAD beyond the embedding is replaced by the stop token for padded inputs (never a
target, never attended to by a real token).

Loading is cached per process: the arms of a grid deep-copy one CPU copy of the weights instead of reading
(and, for a transformers folder, converting) the files again.
"""

from __future__ import annotations

import copy
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from amer.checkpoint import load_checkpoint, read_meta
from amer.config import ModelConfig
from amer.configio import from_dict
from amer.data import ByteTokenizer, load_tokenizer, tokenizer_from_file
from amer.data.chat_template import CONFIG_FILE, ChatTemplate, read_chat_template
from amer.errors import CheckpointError, DataError, ExperimentError, InputError
from amer.experiments.nlrx.encode import ChatFormat
from amer.fileread import json_loads, read_file
from amer.hub import read_pretrained_config
from amer.model import HybridLM

__all__ = ["TEMPLATES", "InitInfo", "describe", "load_model", "chat_format", "fit_vocab"]

TEMPLATES = ("auto", "amer")  # --chat-template: the folder's own where it has one, or always amer's


class InitInfo(NamedTuple):
    path: str  # the folder the weights, tokenizer and template are read from
    kind: str  # "amer" | "transformers"
    cfg: ModelConfig
    sha: str  # weights, tokenizer and template: results from another init are refused


def _is_transformers(p: Path) -> bool:
    try:
        cfg = json_loads(read_file(p / "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") != "amer" and bool(cfg.get("architectures"))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def describe(path: str) -> InitInfo:
    """What ``--init path`` is; its config read without loading weights where the format allows."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").exists() and _is_transformers(p):
        folder, cfg, kind = p, _cpu_model(str(p)).cfg, "transformers"
        weights = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
    else:
        if p.is_dir() and (p / "config.json").is_file() and not (p / "model.safetensors").exists():
            # an amer folder of config and tokenizer only: enough to count a run's cost (--estimate --gpu)
            meta = {"config": {"model": read_pretrained_config(p)["model"]}, "_path": str(p)}
        else:
            meta = read_meta(p)  # a missing or foreign path is a one-line CheckpointError
        folder, kind = Path(meta["_path"]), "amer"
        model_cfg = (meta.get("config") or {}).get("model")
        if not isinstance(model_cfg, dict):
            raise CheckpointError(f"{folder}: no model config (config.json or meta.json's config.model)")
        try:
            cfg = from_dict(ModelConfig, model_cfg, where="model.")
        except InputError as e:
            raise CheckpointError(f"{folder}: {e}") from None
        weights = [folder / "model.safetensors"]
    extra = [folder / "tokenizer.json", folder / "chat_template.jinja", folder / CONFIG_FILE]
    return InitInfo(str(folder), kind, cfg, _digest([*weights, *extra]))


@lru_cache(maxsize=1)
def _cpu_model(path: str) -> HybridLM:
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").exists() and _is_transformers(p):
        from amer.interop import from_transformers

        return from_transformers(p)[0]
    return load_checkpoint(p)[0]  # type: ignore[return-value]


def load_model(path: str, device: str = "cpu") -> HybridLM:
    """A fresh copy of the ``--init`` model (fp32 weights: bfloat16 runs autocast), on ``device``, in train mode."""
    return copy.deepcopy(_cpu_model(str(path))).to(device).train()


def _special(folder: Path, key: str, fallback: str) -> str:
    """``bos_token`` / ``eos_token`` as tokenizer_config.json names it (a string or {"content": ...})."""
    try:
        cfg = json_loads(read_file(folder / CONFIG_FILE))
    except (OSError, ValueError):
        return fallback
    val = cfg.get(key) if isinstance(cfg, dict) else None
    val = val.get("content") if isinstance(val, dict) else val
    return val if isinstance(val, str) else fallback


def chat_format(path: str, template: str = "auto") -> ChatFormat:
    """The tokenizer of the ``--init`` folder and the chat template its examples are rendered with."""
    if template not in TEMPLATES:
        raise ExperimentError(f"--chat-template {template!r}: accepted are {', '.join(TEMPLATES)}")
    folder = Path(describe(str(path)).path)
    if (folder / "tokenizer.json").is_file():
        tok = tokenizer_from_file(folder / "tokenizer.json")
    elif describe(str(path)).kind == "transformers":
        raise DataError(f"{folder}: no tokenizer.json (the Hugging Face tokenizer file the model was trained with)")
    else:
        tok = load_tokenizer(folder)  # a checkpoint written before tokenizers were saved: bytes
    source = read_chat_template(folder) if template == "auto" else None
    if source is None or isinstance(tok, ByteTokenizer):
        return ChatFormat(tok)
    names = (tok.token_text(tok.bos_id) or "", tok.token_text(tok.eos_id) or "")
    tpl = ChatTemplate(source, bos_token=_special(folder, "bos_token", names[0]),
                       eos_token=_special(folder, "eos_token", names[1]), where=f"{folder} chat template")
    return ChatFormat(tok, tpl)


def fit_vocab(sets: list[Any], vocab: int, where: str) -> None:
    """Check every id of the encoded ``sets`` fits a ``vocab``-row embedding; pad with the stop token where the
    tokenizer's PAD does not."""
    top = max(max(seq) for s in sets for seq in s.seqs)
    if top >= vocab:
        raise CheckpointError(f"{where}: the data use token id {top} but the model's embedding has {vocab} rows; "
                              "the tokenizer.json does not belong to this model")
    for s in sets:
        if s.pad_id >= vocab:
            s.pad_id = s.stop_id
