"""Packing documents into fixed-length rows with per-token document ids, the held-out split, and the
deterministic, resumable batch order (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from amer.data.corpora import load_documents
from amer.data.text import utf8_bytes
from amer.data.tokenizer import ByteTokenizer
from amer.errors import ConfigError, DataError

__all__ = ["DataConfig", "PackedDataset", "DataSplits", "split_documents", "build_datasets", "BatchIterator"]


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
        tokenizer: Any,
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
        self.n_bytes = sum(len(utf8_bytes(d)) for d in documents)  # UTF-8 text bytes, for bits per byte
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

    def val_batches(self, batch_size: int, max_batches: int | None = None, *,
                    pad: bool = False) -> Iterator[dict[str, Tensor]]:
        """Fixed-order batches for evaluation; the last one may be smaller, or with ``pad`` is filled up to
        ``batch_size`` with padding rows (token 0, target -100, document id -1: no loss, no STP span), so a
        compiled evaluation (XLA) sees one batch shape.

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
            batch = self.batch(rows[start : start + batch_size])
            short = batch_size - batch["tokens"].shape[0]
            if pad and short > 0:
                fill = {"tokens": 0, "targets": -100, "doc_ids": -1}
                batch = {k: torch.cat([v, v.new_full((short, *v.shape[1:]), fill.get(k, 0))]) for k, v in batch.items()}
            yield batch

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
    sizes = np.fromiter((len(utf8_bytes(d)) + 2 for d in documents), dtype=np.int64, count=len(documents))
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
    b = utf8_bytes(text)
    lo, hi = need - 2, len(b) - (need - 2)  # allowed cut positions keep both pieces big enough
    cut = min(max(int(len(b) * (1.0 - val_fraction)), lo), hi)
    nl = b.rfind(b"\n", lo, cut)
    if nl >= lo and cut - nl <= max(4096, (hi - lo) // 10):
        cut = nl + 1
    else:
        while lo < cut < len(b) and (b[cut] & 0xC0) == 0x80:  # not inside a multi-byte character
            cut -= 1
    return b[:cut].decode("utf-8", errors="replace"), b[cut:].decode("utf-8", errors="replace")


def build_datasets(cfg: DataConfig, tokenizer: Any = None) -> DataSplits:
    """Load ``cfg.source``, hold out validation documents, and pack both splits.

    ``tokenizer`` is a tokenizer (default: bytes) or a function of the training documents returning one
    (how ``--tokenizer bpe:N`` is trained on the training split only). The split is decided on bytes,
    before any tokenizer exists, so every tokenizer sees the same held-out documents;
    ``splits.train.tokenizer`` is the tokenizer used.
    """
    docs = load_documents(cfg.source)
    train_idx, val_idx, docs = split_documents(
        docs, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction, seed=cfg.seed, name=cfg.source
    )
    tok = tokenizer([docs[i] for i in train_idx]) if callable(tokenizer) else tokenizer or ByteTokenizer()
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
