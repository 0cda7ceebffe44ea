"""Pretrained folders: the shape in which a model leaves amer (and comes back), as the ecosystem expects it.

Layout (the Hugging Face convention, so ``huggingface_hub`` can upload and download it as it is)::

    my-model/
        config.json         {"model_type": "amer", "architectures": ["HybridLM"], "amer_version": ...,
                             "model": <ModelConfig>, "tokenizer": <spec>, "source": <where it came from>}
        model.safetensors   weights (tied weights stored once, as transformers does)
        tokenizer.json      the tokenizer, a Hugging Face ``tokenizers`` file (absent: byte tokenizer)

Unlike a training checkpoint there is no optimizer state, RNG or data position: it is what ``from_pretrained``,
``amer sample``, ``amer curvature`` and ``amer train --init`` need. The folder is written whole into a hidden
sibling and renamed into place, so it is complete or absent; an existing folder is replaced only when it holds
nothing but these files (a folder with anything else in it is refused: amer never deletes what it did not write).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amer.config import ModelConfig, from_dict, to_dict
from amer.errors import CheckpointError, InputError
from amer.fileio import (
    atomic_write_text,
    fsync_dir,
    json_text,
    refuse_link,
    remove_own_files,
    replace_dir,
    temp_sibling,
)
from amer.fileread import json_loads, read_file
from amer.model import HybridLM, set_pretrained_io
from amer.version import __version__
from amer.weights import load_tensors, model_from_weights, save_tensors, state_tensors

__all__ = ["PRETRAINED_FILES", "MODEL_TYPE", "save_pretrained", "write_folder", "check_target", "load_pretrained",
           "read_pretrained_config",
           "is_pretrained_folder", "push_to_hub"]

MODEL_TYPE = "amer"
PRETRAINED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
_REPO_ID = re.compile(r"^[\w][\w.-]{0,95}/[\w][\w.-]{0,95}$")


def is_pretrained_folder(path: Path) -> bool:
    """A folder written by :func:`save_pretrained` (config.json of model_type amer, weights), not a run checkpoint."""
    cfg = path / "config.json"
    if not (cfg.is_file() and (path / "model.safetensors").is_file()) or (path / "meta.json").exists():
        return False
    try:
        data = json_loads(read_file(cfg))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def save_pretrained(model: torch.nn.Module, directory: str | Path, *, tokenizer: Any = None,
                    source: dict[str, Any] | None = None, chat_template: str | None = None) -> Path:
    """Write ``model`` (a :class:`~amer.model.HybridLM`) and its ``tokenizer`` as a pretrained folder.

    ``chat_template`` (the Jinja chat template the tokenizer came with, e.g. an imported instruction-tuned model's)
    is kept as ``chat_template.jinja``, where transformers keeps it too.

    ``source`` (optional) is recorded in config.json, e.g. the checkpoint and step it was exported from.
    Refuses non-finite weights and a target folder that holds files amer did not write.
    """
    directory = Path(directory)
    check_target(directory)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to write {directory}: parameter {name} has non-finite values")
    config = {"model_type": MODEL_TYPE, "architectures": ["HybridLM"], "amer_version": __version__,
              "model": to_dict(model.cfg), "tokenizer": getattr(tokenizer, "spec", "byte"),
              **({"source": source} if source else {})}

    def write(tmp: Path) -> None:
        save_tensors(state_tensors(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        if chat_template is not None:
            atomic_write_text(tmp / "chat_template.jinja", chat_template)
        atomic_write_text(tmp / "config.json", json_text(config))

    write_folder(directory, PRETRAINED_FILES, write)
    return directory


def write_folder(directory: Path, own_files: tuple[str, ...], write: Callable[[Path], None]) -> None:
    """Fill a hidden sibling of ``directory`` with ``write(tmp)``, fsync it, then rename it into place (an earlier
    folder is swapped out and only ``own_files`` of it removed): the folder is complete or absent."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(directory)
    tmp.mkdir()
    try:
        write(tmp)
        for name in own_files:
            if (tmp / name).exists():
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, directory, own_files)
    except BaseException:
        if tmp.exists():
            remove_own_files(tmp, own_files)
        raise


def check_target(directory: Path) -> None:
    """Refuse a folder :func:`save_pretrained` must not replace: a link, a file, or a folder holding anything
    amer did not write (checked before any work, so a refusal costs nothing)."""
    refuse_link(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory: choose a new or empty folder to write the "
                         "model to")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in PRETRAINED_FILES)
        if foreign:
            raise InputError(f"{directory} holds files amer did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")
        if any(directory.iterdir()) and not is_pretrained_folder(directory):
            raise InputError(f"{directory} holds a config.json or weights that are not an amer model: "
                             "choose a new or empty folder")


def read_pretrained_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a pretrained folder, checked to be amer's, as a dict."""
    path = Path(directory) / "config.json"
    try:
        data = json_loads(read_file(path))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json: not a pretrained folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if isinstance(data, dict) and data.get("model_type") == MODEL_TYPE and not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: the model section (the model's settings) is missing or not an object, "
                              f"got {data.get('model')!r:.40}; export the model again with `amer export`")
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        kind = data.get("model_type") if isinstance(data, dict) else None
        hint = (f" (model_type {kind!r}: convert it with `amer import {directory} OUT`)" if kind else "")
        raise CheckpointError(f"{path} is not an amer model config{hint}")
    return data


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[HybridLM, ModelConfig]:
    """``(model, config)`` from a pretrained folder (a local path, or an ``owner/name`` Hub repository id when no
    such local path exists), in eval mode."""
    directory = _local(directory)
    config = read_pretrained_config(directory)
    try:
        cfg = from_dict(ModelConfig, config["model"], where="model.")
    except InputError as e:
        raise CheckpointError(f"{directory}/config.json: {e}") from None
    weights = load_tensors(directory / "model.safetensors")
    model = model_from_weights(cfg, weights, str(directory), device)
    model.eval()
    return model, cfg


def _local(path: str | Path) -> Path:
    """A local folder, or the snapshot of Hub repository ``path`` (downloaded only when no local path exists)."""
    p = Path(path)
    if p.exists() or not _REPO_ID.match(str(path)):
        if not p.is_dir():
            raise CheckpointError(f"pretrained folder not found: {p}")
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=list(PRETRAINED_FILES)))
    except Exception as e:  # offline, unknown repository, authentication: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a local folder, and downloading it from the Hub failed: "
                              f"{first}") from None


def push_to_hub(model: torch.nn.Module, repo_id: str, *, tokenizer: Any = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload amer model") -> str:
    """Write the pretrained folder to a temporary directory and upload it to the Hub repository ``repo_id``
    (created if needed). Needs a network and a token; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", tokenizer=tokenizer)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(info)


class _PretrainedFolders:
    """What :meth:`HybridLM.from_pretrained`, :meth:`~HybridLM.save_pretrained` and :meth:`~HybridLM.push_to_hub`
    do: this module's functions, handed to the model (which knows no file formats) when amer is imported."""

    def load(self, path: str | Path, *, device: str | torch.device) -> HybridLM:
        return load_pretrained(path, device=device)[0]

    def save(self, model: HybridLM, directory: str | Path, *, tokenizer: Any) -> Path:
        return save_pretrained(model, directory, tokenizer=tokenizer)

    def push(self, model: HybridLM, repo_id: str, *, tokenizer: Any, **hub_kwargs: Any) -> str:
        return push_to_hub(model, repo_id, tokenizer=tokenizer, **hub_kwargs)


set_pretrained_io(_PretrainedFolders())
