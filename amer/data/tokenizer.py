"""The byte tokenizer (256 byte ids plus BOS, EOS, PAD and chat markers) and the chat template, with the
character spans of each message mapped to byte spans."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from amer.data.hftok import byte_tokenizer_json
from amer.data.text import utf8_bytes
from amer.errors import DataError
from amer.fileio import atomic_write_text

__all__ = ["ByteTokenizer", "render_chat", "render_chat_with_spans", "char_spans_to_byte_spans"]


class ByteTokenizer:
    """UTF-8 bytes as tokens (ByT5, Xue et al. 2022): no training, no files, any text round-trips.

    Ids 0..255 are the bytes; 256 = BOS, 257 = EOS, 258 = PAD, 259 reserved (vocab_size 260, which
    keeps the embedding a multiple of 4 rows).
    """

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 260
    spec: str = "byte"  # the --tokenizer value that names it

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, optionally wrapped in BOS/EOS."""
        ids = list(utf8_bytes(text))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self) -> list[int]:
        """Bytes of text each id stands for (1 for a byte, 0 for BOS/EOS/PAD): the denominator of bits per byte."""
        return [1] * 256 + [0] * (self.vocab_size - 256)

    def decode(self, ids: Iterable[int] | Tensor | np.ndarray) -> str:
        """Text of the byte ids; special/reserved ids are dropped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_documents(self, documents: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pack documents as ``[BOS] + bytes + [EOS]`` into one int16 stream, without a per-byte loop.

        Returns ``(stream (N,) int16, lengths (n_docs,) int64)`` where ``lengths`` counts BOS/EOS.
        """
        encoded = [utf8_bytes(d) for d in documents]
        lengths = np.fromiter((len(b) + 2 for b in encoded), dtype=np.int64, count=len(encoded))
        stream = np.empty(int(lengths.sum()), dtype=np.int16)
        ends = np.cumsum(lengths)  # exclusive end of each document
        starts = ends - lengths
        body = np.ones(stream.shape[0], dtype=bool)
        body[starts] = False
        body[ends - 1] = False
        stream[starts] = self.bos_id
        stream[ends - 1] = self.eos_id
        stream[body] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return stream, lengths

    def encode_with_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, token_spans)``: character spans of ``text`` as byte-token spans."""
        return self.encode(text), char_spans_to_byte_spans(text, spans)

    def to_json(self) -> str:
        """This tokenizer as an equivalent Hugging Face ``tokenizer.json`` (see :mod:`amer.data.hftok`)."""
        return byte_tokenizer_json()

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically (complete or absent)."""
        return atomic_write_text(path, self.to_json())

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# ----------------------------------------------------------------------------------------------
# chat template


def render_chat_with_spans(
    messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False, where: str = "messages"
) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and return ``(text, assistant_spans)``.

    Template (one turn per block, any role name)::

        <|system|>
        Convert natural language to regular expression.
        <|user|>
        lines with words with a vowel
        <|assistant|>
        \\b[AEIOUaeiou]\\b

    i.e. each turn is ``"<|" + role + "|>\\n" + content + "\\n"``. ``assistant_spans`` are
    ``[start, end)`` character offsets of each assistant turn's content plus its closing newline
    (the newline is what ends the answer, so a loss on these spans teaches the model to stop).
    ``add_generation_prompt`` appends ``"<|assistant|>\\n"`` for sampling an answer.
    Character offsets, not byte offsets: see :func:`char_spans_to_byte_spans` for byte tokens.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string \"role\" and \"content\"")
        header = f"<|{m['role']}|>\n"
        body = m["content"] + "\n"
        parts += [header, body]
        pos += len(header)
        if m["role"] == "assistant":
            spans.append((pos, pos + len(body)))
        pos += len(body)
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts), spans


def render_chat(messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
    """Render a chat with the template of :func:`render_chat_with_spans`."""
    return render_chat_with_spans(messages, add_generation_prompt=add_generation_prompt)[0]


def char_spans_to_byte_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of ``text`` -> spans of its UTF-8 bytes (= byte-token positions, before BOS)."""
    return [(len(utf8_bytes(text[:s])), len(utf8_bytes(text[:e]))) for s, e in spans]


