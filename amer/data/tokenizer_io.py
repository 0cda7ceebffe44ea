"""Tokenizers in and out: the one function that turns a ``--tokenizer`` value (``byte``, ``bpe:N``, a path) into
a tokenizer, and the loaders of the ``tokenizer.json`` saved with every checkpoint and pretrained folder (amer's
own byte-tokenizer file comes back as a :class:`~amer.data.tokenizer.ByteTokenizer`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amer.data.hftok import (
    BPE_MAX,
    BPE_MIN,
    VOCAB_MULTIPLE,
    HFTokenizer,
    first_line,
    hf_from_str,
    is_byte_tokenizer_json,
    train_bpe,
)
from amer.data.tokenizer import ByteTokenizer
from amer.errors import ConfigError, DataError
from amer.fileread import file_kind, json_loads, read_regular

__all__ = ["tokenizer_from_file", "load_tokenizer", "make_tokenizer", "check_spec", "model_vocab_size"]


def tokenizer_from_file(path: str | Path, *, spec: str | None = None) -> ByteTokenizer | HFTokenizer:
    """Wrap an existing ``tokenizer.json`` (or the one inside folder ``path``); amer's own byte-tokenizer
    file comes back as a :class:`ByteTokenizer`."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists() and not p.is_symlink():
        raise DataError(f"tokenizer file not found: {p}; pass 'byte', 'bpe:N' (e.g. bpe:8192) or the path of "
                        "a Hugging Face tokenizer.json")
    raw = read_regular(p, lambda why: DataError(f"tokenizer file {p} {why}; give a Hugging Face tokenizer.json"))
    try:
        text = raw.decode("utf-8")
        obj = json_loads(text)
    except ValueError as e:  # not UTF-8, not JSON, or nested thousands deep
        raise DataError(f"{p}: not a readable Hugging Face tokenizer.json ({first_line(e)})") from None
    if is_byte_tokenizer_json(obj):
        return ByteTokenizer()
    try:
        hf = hf_from_str(text)
    except Exception as e:  # the Rust side raises plain Exceptions for malformed files
        raise DataError(f"{p}: not a Hugging Face tokenizer.json ({first_line(e)})") from None
    return HFTokenizer(hf, spec or str(path), where=str(p))


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer saved in a checkpoint or exported folder (``directory/tokenizer.json``); the byte
    tokenizer for a folder without one (checkpoints written before tokenizers were saved)."""
    p = Path(directory) / "tokenizer.json"
    return tokenizer_from_file(p) if p.exists() else ByteTokenizer()


def check_spec(spec: str) -> int | Path | None:
    """Validate a ``--tokenizer`` value before any slow work: None for ``byte``, N for ``bpe:N``, the file
    for a path."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--tokenizer must be 'byte', 'bpe:N' or a tokenizer.json path, got {spec!r}")
    if spec == "byte":
        return None
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not (n.isascii() and n.isdigit()) or not BPE_MIN <= int(n) <= BPE_MAX:
            raise ConfigError(f"--tokenizer {spec}: N in bpe:N must be an integer from {BPE_MIN} (the 256 bytes "
                              f"and {BPE_MIN - 256} special tokens) to {BPE_MAX}, e.g. bpe:8192")
        return int(n)
    p = Path(spec)
    inner = p / "tokenizer.json" if p.is_dir() else p
    why = file_kind(inner)
    if why is not None and inner.exists():  # a FIFO, a device: say what it is, not "no such file"
        raise ConfigError(f"--tokenizer {spec}: {inner} {why}; give a Hugging Face tokenizer.json")
    if why is not None:
        raise ConfigError(f"--tokenizer {spec}: no such tokenizer.json; pass 'byte', 'bpe:N' (e.g. bpe:8192) "
                          "or the path of a Hugging Face tokenizer.json (or of a folder holding one)")
    return p


def make_tokenizer(spec: str, train_documents: Sequence[str]) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``--tokenizer spec`` names; ``bpe:N`` is trained on ``train_documents``."""
    arg = check_spec(spec)
    if arg is None:
        return ByteTokenizer()
    if isinstance(arg, int):
        return train_bpe(train_documents, arg, spec=spec)
    return tokenizer_from_file(arg, spec=spec)


def model_vocab_size(tok: Any) -> int:
    """Embedding rows for ``tok``: the byte tokenizer's 260, else its size rounded up to a multiple of 64
    (the extra rows are never produced by the data and never decoded)."""
    if isinstance(tok, ByteTokenizer):
        return tok.vocab_size
    return -(-int(tok.vocab_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
