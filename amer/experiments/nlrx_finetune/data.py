"""Chat examples for fine-tuning: the NL-RX encoding plus the span form's content mask and a choice of
next-token targets; and the pretraining corpus (the bundled King James Bible and Python standard library).

Content mask (``stp_content``): the positions the span form of STP may use as endpoints, as the STP
paper's released code chooses them: the user message's content and the assistant message's content,
each with the state just before its first token (the released code reads ``hidden_states[start - 1]``),
so the chat template between the two turns is cut out of the trajectory (see :mod:`amer.stp.span`).
The stop token (EOS, or the end-of-turn token of a model's own chat template) and the template tokens are never
endpoints. The spans come from the example's encoding (:mod:`amer.experiments.nlrx.encode`), so they are the
same for bytes, a BPE and any model's tokenizer and template.

Targets: ``assistant`` puts next-token CE on the answer and its stop token only (what ``amer experiment nlrx``
trains); ``all`` on every next token of the example (system turn if kept, template, description, answer,
stop token), which is what the released code's data collator ends up training (it overwrites the
assistant-only labels with the inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from amer.data import ByteTokenizer, PackedDataset, load_documents
from amer.errors import ExperimentError
from amer.experiments.nlrx.data import Example, ExampleSet
from amer.experiments.nlrx.encode import ChatFormat

__all__ = ["NTP_TARGETS", "ChatSet", "pretraining_corpus", "PRETRAIN_SOURCES"]

NTP_TARGETS = ("assistant", "all")
PRETRAIN_SOURCES = ("kjv", "stdlib")


class ChatSet(ExampleSet):
    """:class:`~amer.experiments.nlrx.data.ExampleSet` whose batches also carry ``stp_content`` and whose
    targets are the answer's (``ntp="assistant"``) or every token's (``ntp="all"``)."""

    def __init__(self, examples: Sequence[Example], tok: Any, *, system: bool = False,
                 ntp: str = "assistant", name: str = "nlrx", fmt: ChatFormat | None = None) -> None:
        if ntp not in NTP_TARGETS:
            raise ExperimentError(f"--ntp-targets {ntp!r}: accepted are {', '.join(NTP_TARGETS)}")
        super().__init__(examples, tok, system=system, name=name, fmt=fmt)
        self.ntp = ntp

    def subset(self, rows: Sequence[int]) -> ChatSet:
        new = super().subset(rows)
        new.__class__ = ChatSet
        new.ntp = self.ntp
        return new  # type: ignore[return-value]

    def batch(self, rows: Tensor | Sequence[int]) -> dict[str, Tensor]:
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        out = super().batch(rows)
        T = out["tokens"].shape[1]
        content = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            seq, start = self.seqs[r], self.starts[r]
            n = len(seq) - 1
            u0, u1 = self.users[r]  # input positions allowed as endpoints: [u0 - 1, u1 - 1] and [a0 - 1, n - 1]
            content[b, u0 - 1 : u1] = True
            content[b, start - 1 : n] = True
            if self.ntp == "all":
                out["targets"][b, :n] = torch.tensor(seq[1:])
        out["stp_content"] = content
        return out

    def target_only(self) -> ChatSet:
        """The same examples with answer-only targets: held-out CE is always reported on the answer."""
        new = self.subset(range(len(self)))
        new.ntp = "assistant"
        return new


def pretraining_corpus(seq_len: int, tok: ByteTokenizer, *, max_bytes: int | None = None) -> PackedDataset:
    """The bundled corpora packed into rows of ``seq_len`` with document ids (no validation split: the
    held-out measurements that matter here are on NL-RX). ``max_bytes`` keeps the first documents of each
    corpus, the last one cut, up to that many bytes (for ``--quick``)."""
    docs: list[str] = []
    for src in PRETRAIN_SOURCES:
        taken = 0
        for d in load_documents(src):
            if max_bytes is not None:
                if taken >= max_bytes:
                    break
                d = d.encode("utf-8")[: max_bytes - taken].decode("utf-8", errors="ignore")
            docs.append(d)
            taken += len(d.encode("utf-8"))
    return PackedDataset(docs, tok, seq_len, name="+".join(PRETRAIN_SOURCES))

