"""Subword tokenizers through the Hugging Face ``tokenizers`` library (Rust: fast, offline): a byte-level
BPE trained on a run's training split, or any ``tokenizer.json`` a user has on disk. The one module that
imports ``tokenizers``; :mod:`amer.data.tokenizer_io` turns a ``--tokenizer`` value into a tokenizer.

Three forms of ``--tokenizer``:

* ``byte``: :class:`~amer.data.tokenizer.ByteTokenizer` (UTF-8 bytes, ids 0..255, BOS/EOS/PAD 256..258).
* ``bpe:N``: a byte-level BPE (GPT-2's scheme, Radford et al. 2019; BPE: Sennrich et al. 2016) of
  vocabulary N, trained at start-up on the training documents only (validation text never shapes the
  vocabulary). Ids 0..5 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, ``<|system|>``, ``<|user|>``,
  ``<|assistant|>`` (special tokens: the chat template's markers are one token each), then the 256 byte
  symbols, then the merges. Training is deterministic for a given corpus (the same documents give the
  same file, also in another process; tests/test_tokenizers.py checks it), so runs are reproducible; a
  resumed run still reads the saved file instead of retraining.
* a path: a Hugging Face ``tokenizer.json`` (or a folder holding one), e.g. a Llama or GPT-2 tokenizer.
  BOS/EOS/PAD are found by name (:data:`BOS_NAMES`, :data:`EOS_NAMES`, :data:`PAD_NAMES`), special tokens
  first. Without an end-of-text token the file is refused (nothing marks where a document ends); without
  a BOS the EOS token doubles as BOS (GPT-2's ``<|endoftext|>`` convention); without a PAD, ``<|pad|>`` is
  added as a new special token (so padding never aliases a real token). Chat markers are used as the
  file has them: one token where it defines them, text otherwise.

Whatever the form, the tokenizer a run uses is written as ``tokenizer.json`` next to every checkpoint;
the byte tokenizer is written as an equivalent Hugging Face file (so an exported model carries a usable
tokenizer) and recognised as the byte tokenizer when read back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from amer.data.text import utf8_bytes
from amer.errors import ConfigError, DataError
from amer.fileio import atomic_write_text
from amer.fileread import json_loads

__all__ = ["HFTokenizer", "train_bpe", "byte_tokenizer_json", "is_byte_tokenizer_json", "first_line", "hf_from_str",
           "BOS_NAMES", "EOS_NAMES", "PAD_NAMES", "AMER_SPECIALS",
           "CHAT_MARKERS", "BPE_MIN", "BPE_MAX"]

AMER_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")  # amer's chat template (render_chat)
BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
BPE_MIN = 256 + len(AMER_SPECIALS) + len(CHAT_MARKERS)  # the byte alphabet and the special tokens
BPE_MAX = 1 << 20
VOCAB_MULTIPLE = 64  # embedding rows of a subword model: a multiple of 64 (tensor-core friendly matmuls)


def _hf() -> Any:
    """The ``tokenizers`` package: the one place it is imported."""
    try:
        import tokenizers
    except ImportError:  # a core dependency; only a broken install lacks it
        raise ConfigError("--tokenizer bpe:N and tokenizer.json files need the 'tokenizers' package: "
                          "pip install 'tokenizers>=0.20'") from None
    return tokenizers


def _clean(text: str) -> str:
    """Text the Rust side accepts: a lone surrogate (legal in JSON) becomes U+FFFD, as the byte tokenizer does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return utf8_bytes(text).decode("utf-8")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with amer's tokenizer interface (``encode``, ``decode``,
    ``encode_documents``, ``encode_with_spans``, ``save``, ``bos_id``/``eos_id``/``pad_id``, ``vocab_size``).

    ``hf`` is modified only to add a missing PAD token (see the module docstring).
    """

    def __init__(self, hf: Any, spec: str, *, where: str | None = None) -> None:
        where = where or spec
        self.hf, self.spec = hf, spec
        eos = self._find(EOS_NAMES)
        if eos is None:
            raise DataError(f"{where}: the tokenizer has no end-of-text token (looked for {' '.join(EOS_NAMES)}); "
                            "amer needs one to end each document: add one as a special token, or use "
                            "--tokenizer bpe:N or byte")
        bos = self._find(BOS_NAMES)
        pad = self._find(PAD_NAMES)
        if pad is None:
            hf.add_special_tokens([_hf().AddedToken(AMER_SPECIALS[2], special=True)])
            pad = hf.token_to_id(AMER_SPECIALS[2])
        self.eos_id, self.bos_id, self.pad_id = eos, eos if bos is None else bos, pad
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        try:
            probe = hf.encode("Probe: 1 line.\n", add_special_tokens=False).ids
        except Exception as e:  # e.g. a word-level model without an unknown token
            raise DataError(f"{where}: the tokenizer cannot encode plain text ({first_line(e)})") from None
        if not probe:
            raise DataError(f"{where}: the tokenizer encodes plain text to no tokens at all")

    def _find(self, names: Sequence[str]) -> int | None:
        """The id of the first of ``names`` among the special tokens, else among all tokens."""
        special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        for pool in (special, None):
            for n in names:
                i = special.get(n) if pool is not None else self.hf.token_to_id(n)
                if i is not None:
                    return int(i)
        return None

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when the tokenizer has it as one token (e.g. a chat marker), else None."""
        i = self.hf.token_to_id(token)
        return None if i is None else int(i)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (the file's own post-processing, e.g. an automatic BOS, is not applied:
        amer places BOS/EOS itself), optionally wrapped in BOS/EOS."""
        ids = list(self.hf.encode(_clean(text), add_special_tokens=False).ids)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_with_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, token_spans)``: character spans ``[s, e)`` of ``text`` mapped through the tokenizer's
        offsets to the token spans covering them (a token is inside when it overlaps the span)."""
        enc = self.hf.encode(_clean(text), add_special_tokens=False)
        ends = np.array([b for _, b in enc.offsets], dtype=np.int64)
        starts = np.array([a for a, _ in enc.offsets], dtype=np.int64)
        out = [(int(np.searchsorted(ends, s, side="right")), int(np.searchsorted(starts, e, side="left")))
               for s, e in spans]
        return list(enc.ids), out

    def encode_with_offsets(self, text: str, *, where: str | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)``: the tokens of ``text`` and the ``[start, end)`` characters each covers. Offsets that
        cannot place the tokens in the text (none, out of order, outside it) are refused: the answer and STP spans
        of chat data are located through them."""
        enc = self.hf.encode(_clean(text), add_special_tokens=False)
        ids, offsets = list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]
        ok = len(offsets) == len(ids) and all(0 <= a <= b <= len(text) for a, b in offsets)
        ok = ok and all(offsets[i][0] >= offsets[i - 1][0] for i in range(1, len(offsets)))
        covered = sum(b > a for a, b in offsets)
        if not ok or (ids and covered == 0 and text):
            raise DataError(f"{where or self.spec}: the tokenizer gives no usable character offsets (each token's "
                            "place in the text), which locating answer and STP spans needs; use a tokenizer.json "
                            "whose model reports offsets (BPE, WordPiece, Unigram all do)")
        return ids, offsets

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is a special token (BOS/EOS/PAD, chat markers such as ``<|eot_id|>``)."""
        tok = self.hf.get_added_tokens_decoder().get(int(i))
        return bool(tok is not None and tok.special) or int(i) in (self.bos_id, self.eos_id, self.pad_id)

    def token_text(self, i: int) -> str | None:
        """The text of token ``i`` as the vocabulary spells it (a special token's name), None when unknown."""
        return self.hf.id_to_token(int(i))

    def token_bytes(self) -> list[int]:
        """Bytes of text each id stands for, 0 for special tokens (BOS/EOS/PAD, chat markers): the denominator
        of bits per byte. A byte-level BPE (amer's own ``bpe:N``, GPT-2 style files) maps a token's characters
        back to bytes one to one; a byte-fallback token ``<0xNN>`` is one byte; any other token counts what it
        adds to the text after an anchor token, so a SentencePiece word-start ``\u2581`` counts its space (the
        one a decoder strips at the start of a text)."""
        special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        special |= {self.bos_id, self.eos_id, self.pad_id}
        byte_level = type(self.hf.decoder).__name__ == "ByteLevel"
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        anchor: int | None = None

        def added(i: int) -> int:
            nonlocal anchor
            if anchor is None:  # a plain token to decode after: decoders treat a text's first token apart
                anchor = next(j for j in [self.token_id("a"), *range(self.vocab_size)]
                              if j is not None and j not in special and self.hf.decode([j]))
            before = len(self.hf.decode([anchor], skip_special_tokens=False).encode("utf-8"))
            return max(0, len(self.hf.decode([anchor, i], skip_special_tokens=False).encode("utf-8")) - before)

        out = []
        for i in range(self.vocab_size):
            piece = None if i in special else self.hf.id_to_token(i)
            if piece is None:
                out.append(0)
            elif byte_level and all(c in inverse for c in piece):
                out.append(len(piece))
            elif _BYTE_FALLBACK.fullmatch(piece):
                out.append(1)
            else:
                out.append(added(i))
        return out

    def decode(self, ids: Iterable[int] | Tensor | np.ndarray) -> str:
        """Text of ``ids``: BOS/EOS/PAD and ids outside the vocabulary (padding rows) are dropped, as the byte
        tokenizer drops its own; other special tokens (the chat markers) are kept, so the text round-trips."""
        if isinstance(ids, Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self.hf.decode([i for i in ids if 0 <= i < self.vocab_size and i not in drop],
                              skip_special_tokens=False)

    def encode_documents(self, documents: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pack documents as ``[BOS] + tokens + [EOS]`` into one stream (batched on the Rust side's threads).

        Returns ``(stream (N,) int16 or int32, lengths (n_docs,) int64)``; ``lengths`` counts BOS/EOS.
        """
        texts = [_clean(d) for d in documents]
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # fast: no offsets
        encoded = [e.ids for e in batch(texts, add_special_tokens=False)] if texts else []
        dtype = np.int16 if self.vocab_size <= np.iinfo(np.int16).max else np.int32
        lengths = np.fromiter((len(ids) + 2 for ids in encoded), dtype=np.int64, count=len(encoded))
        stream = np.empty(int(lengths.sum()), dtype=dtype)
        ends = np.cumsum(lengths)  # exclusive end of each document; as ByteTokenizer.encode_documents
        body = np.ones(stream.shape[0], dtype=bool)
        body[ends - lengths] = False
        body[ends - 1] = False
        stream[ends - lengths] = self.bos_id
        stream[ends - 1] = self.eos_id
        stream[body] = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(body.sum()))
        return stream, lengths

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> Path:
        """Write the Hugging Face ``tokenizer.json`` atomically (complete or absent)."""
        return atomic_write_text(path, self.to_json())

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's token for one raw byte


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (Radford et al. 2019): printable bytes stand for themselves, the other 68
    are shifted above U+00FF, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(shifted)}}


def train_bpe(documents: Sequence[str], vocab_size: int, *, spec: str | None = None) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (fewer when the text runs out of pairs) trained on
    ``documents``; deterministic for a given list of documents."""
    tk = _hf()
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*AMER_SPECIALS, *CHAT_MARKERS],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator((_clean(d) for d in documents), trainer, length=len(documents))
    return HFTokenizer(hf, spec or f"bpe:{vocab_size}")


@lru_cache(maxsize=1)
def byte_tokenizer_json() -> str:
    """The byte tokenizer as a Hugging Face ``tokenizer.json``: a merge-free byte-level BPE whose 256
    symbols have the byte values as ids, then ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and a reserved token
    at 256..259."""
    tk = _hf()
    table = tk.pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte table
    # rebuild GPT-2's byte -> symbol map (bytes_to_unicode) to give each symbol its byte value as id
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    sym, extra = {}, 0
    for b in range(256):
        if b in printable:
            sym[b] = chr(b)
        else:
            sym[b], extra = chr(256 + extra), extra + 1
    assert sorted(sym.values()) == sorted(table)
    hf = tk.Tokenizer(tk.models.BPE(vocab={s: b for b, s in sym.items()}, merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens([tk.AddedToken(t, special=True) for t in (*AMER_SPECIALS, "<|reserved|>")])
    return hf.to_str()


_BYTE_KEYS = ("model", "added_tokens", "pre_tokenizer", "normalizer", "decoder", "post_processor")


def is_byte_tokenizer_json(obj: Any) -> bool:
    """Whether ``obj`` (a parsed tokenizer.json) is amer's byte tokenizer as :func:`byte_tokenizer_json` writes it."""
    ref = json_loads(byte_tokenizer_json())
    return isinstance(obj, dict) and all(obj.get(k) == ref.get(k) for k in _BYTE_KEYS)


def hf_from_str(text: str) -> Any:
    """A ``tokenizers.Tokenizer`` parsed from the text of a tokenizer.json (raises the library's own errors)."""
    return _hf().Tokenizer.from_str(text)
