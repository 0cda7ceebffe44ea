"""Data: tokenizers (bytes, a trained byte-level BPE, or any Hugging Face tokenizer.json), corpora, packing
with document ids, and a resumable batch order.

Pipeline (nanoGPT / torchtitan style, everything in memory, nothing cached on disk)::

    docs = load_documents("kjv")                  # list[str]: "kjv" | "stdlib" | a file or directory
    splits = build_datasets(DataConfig(source="kjv", seq_len=256))
    it = BatchIterator(splits.train, batch_size=8, seed=0)
    batch = next(it)                              # tokens, targets, doc_ids: (B, T) int64
    state = it.state_dict()                       # {"epoch", "position"}: resume exactly here
    for vb in splits.val.val_batches(8, max_batches=20): ...

Tokenizers. ``make_tokenizer(spec, train_docs)`` turns ``--tokenizer`` (``byte``, ``bpe:N``, a path) into a
tokenizer; ``load_tokenizer(dir)`` reads the ``tokenizer.json`` saved with a checkpoint (bytes when there is
none); see :mod:`amer.data.tokenizer_io`.

Packing. Every document becomes ``[BOS] + tokens + [EOS]`` (tokens: utf8 bytes for the byte tokenizer); documents are
concatenated into one
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

from amer.data.corpora import NAMED_CORPORA, iter_jsonl, load_documents, load_kjv, load_path, load_stdlib
from amer.data.hftok import HFTokenizer, train_bpe
from amer.data.packing import BatchIterator, DataConfig, DataSplits, PackedDataset, build_datasets, split_documents
from amer.data.tokenizer import ByteTokenizer, char_spans_to_byte_spans, render_chat, render_chat_with_spans
from amer.data.tokenizer_io import check_spec, load_tokenizer, make_tokenizer, model_vocab_size, tokenizer_from_file
from amer.errors import DataError

__all__ = [
    "DataError", "ByteTokenizer", "HFTokenizer", "train_bpe", "tokenizer_from_file", "load_tokenizer",
    "make_tokenizer", "check_spec", "model_vocab_size", "render_chat", "render_chat_with_spans",
           "char_spans_to_byte_spans", "NAMED_CORPORA",
    "load_documents", "load_kjv", "load_stdlib", "load_path", "iter_jsonl", "DataConfig", "PackedDataset",
    "DataSplits", "split_documents", "build_datasets", "BatchIterator",
]
