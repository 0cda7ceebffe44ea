"""Tokenizers: bytes, a byte-level BPE trained on the training split (``--tokenizer bpe:N``), and any Hugging
Face ``tokenizer.json`` (``--tokenizer PATH``): round-trips, special tokens, determinism, packing with the
same document ids, the vocabulary following the tokenizer, the tokenizer saved with every checkpoint and
reused by resume (bit-identical, never retrained) and by ``amer sample``, and the NL-RX span mapping.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import amer.cli as cli
import amer.cli.train as train_cli
import amer.data.hftok as hftok
import amer.data.tokenizer_io as tokenizer_io
from amer.checkpoint import list_checkpoints, read_checkpoint
from amer.data import (
    ByteTokenizer,
    DataConfig,
    HFTokenizer,
    build_datasets,
    load_documents,
    load_tokenizer,
    make_tokenizer,
    model_vocab_size,
    tokenizer_from_file,
    train_bpe,
)
from amer.errors import ConfigError, DataError
from amer.experiments.nlrx.data import Example, encode_example

TEXTS = ["In the beginning God created the heaven and the earth.\n", "naïve café: ünïcödé ✓ 😀 日本語",
         "def f(x):\n\treturn x ** 2  # comment\n", "", "<|user|>\nlines with a vowel\n<|assistant|>\n\\b[AEIOU]\\b\n"]


@pytest.fixture(scope="module")
def kjv() -> list[str]:
    return load_documents("kjv")[:120]


@pytest.fixture(scope="module")
def bpe(kjv: list[str]) -> HFTokenizer:
    return train_bpe(kjv, 512)


def _user_tokenizer(specials: list[str], words: list[str]) -> Tokenizer:
    """A small BPE with the given special tokens, trained here: stands in for a Llama/GPT-2 file on disk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(words, trainer)
    return tok


# ---------------------------------------------------------------- round trips


def test_byte_round_trip_and_its_tokenizer_json(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    assert isinstance(again, ByteTokenizer)  # recognised: byte runs stay on the exact byte code path
    # the written file is a real Hugging Face tokenizer giving the same ids (what an exported model carries)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for t in TEXTS:
        assert hf.encode(t, add_special_tokens=False).ids == tok.encode(t)
        assert hf.decode(tok.encode(t)) == t
    assert [hf.id_to_token(i) for i in (256, 257, 258)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert isinstance(load_tokenizer(tmp_path / "nothing-here"), ByteTokenizer)  # old checkpoints: bytes


def test_trained_bpe_round_trips_and_maps_specials(bpe: HFTokenizer) -> None:
    assert bpe.vocab_size == 512 and bpe.spec == "bpe:512"
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    for t in TEXTS:
        assert bpe.decode(bpe.encode(t)) == t
    # the chat markers are single special tokens (kept by decode, which drops BOS/EOS/PAD as bytes do)
    ids = bpe.encode("<|user|>\nhi\n<|assistant|>\n")
    assert ids[0] == bpe.token_id("<|user|>") == 4 and bpe.token_id("<|assistant|>") in ids
    assert bpe.decode([bpe.bos_id, *bpe.encode("And God"), bpe.eos_id]) == "And God"
    # subwords: far fewer tokens than bytes on the text it was trained on
    text = "And God said, Let there be light: and there was light."
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())
    assert model_vocab_size(bpe) == 512 and model_vocab_size(train_bpe(["ab cd"] * 3, 300)) % 64 == 0


def test_bpe_training_is_deterministic_and_depends_on_the_corpus(kjv: list[str], bpe: HFTokenizer) -> None:
    assert train_bpe(kjv, 512).to_json() == bpe.to_json()
    # another process (other hash seeds, another thread schedule) trains the same file
    code = ("import hashlib; from amer.data import load_documents, train_bpe; "
            "print(hashlib.sha256(train_bpe(load_documents('kjv')[:120], 512).to_json().encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert other.stdout.strip() == hashlib.sha256(bpe.to_json().encode()).hexdigest()
    assert train_bpe(kjv[:60], 512).to_json() != bpe.to_json()  # negative control: the comparison can fail


def test_user_tokenizer_json_specials_found_added_or_refused(tmp_path: Path) -> None:
    words = ["the cat sat on the mat"] * 5 + ["a dog and a log"] * 5
    # Llama/Mistral names: <s> and </s> found; no PAD, so <|pad|> is added after the vocabulary
    p = tmp_path / "llama" / "tokenizer.json"
    p.parent.mkdir()
    _user_tokenizer(["<unk>", "<s>", "</s>"], words).save(str(p))
    tok = tokenizer_from_file(p)
    assert isinstance(tok, HFTokenizer) and tok.spec == str(p)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.vocab_size - 1 and tok.hf.id_to_token(tok.pad_id) == "<|pad|>"
    for t in ["the cat sat", "a dog", "naïve ✓"]:
        assert tok.decode(tok.encode(t, bos=True, eos=True)) == t
    assert isinstance(tokenizer_from_file(p.parent), HFTokenizer)  # a folder holding tokenizer.json
    # GPT-2's single <|endoftext|> is both BOS and EOS
    g = tmp_path / "gpt2.json"
    _user_tokenizer(["<|endoftext|>"], words).save(str(g))
    gpt2 = tokenizer_from_file(g)
    assert gpt2.bos_id == gpt2.eos_id == 0 != gpt2.pad_id
    # no end-of-text token at all: refused in one line naming what was looked for
    n = tmp_path / "nospecials.json"
    _user_tokenizer([], words).save(str(n))
    with pytest.raises(DataError, match="no end-of-text token") as e:
        tokenizer_from_file(n)
    assert "\n" not in str(e.value) and "</s>" in str(e.value)


@pytest.mark.parametrize("spec,needle", [("bpe:0", "bpe:N"), ("bpe:abc", "bpe:N"), ("bpe:", "bpe:N"),
                                         ("bpe:261", "262"), ("bpe:-5", "bpe:N"), ("", "byte"),
                                         ("/no/such/tokenizer.json", "no such tokenizer.json")])
def test_bad_specs_are_one_line_errors(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_tokenizer(spec, ["some text"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_broken_tokenizer_files_are_one_line_errors(tmp_path: Path) -> None:
    for name, text in {"garbage.json": "{not json", "other.json": '{"model": {"type": "Nope"}}'}.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as e:
            tokenizer_from_file(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- packing


def test_bpe_packing_keeps_document_ids_and_trains_on_the_training_split_only(corpus: Path) -> None:
    cfg = DataConfig(source=str(corpus), seq_len=64, val_fraction=0.05, seed=0)
    seen: list[list[str]] = []

    def make(train_docs: list[str]) -> HFTokenizer:
        seen.append(train_docs)
        return train_bpe(train_docs, 512)

    sub, byte = build_datasets(cfg, make), build_datasets(cfg, ByteTokenizer())
    assert len(seen) == 1 and len(seen[0]) == byte.train.n_documents  # trained on the training documents
    val_docs = set(load_documents(str(corpus))[i] for i in byte.val.doc_indices)
    assert not val_docs & set(seen[0])  # ... none of the held-out ones
    for a, b in [(sub.train, byte.train), (sub.val, byte.val)]:
        assert np.array_equal(a.doc_indices, b.doc_indices)  # the same documents, the same ids
        assert torch.equal(torch.unique_consecutive(a.doc_ids), torch.unique_consecutive(b.doc_ids))
    tok = sub.train.tokenizer
    stream, lengths = tok.encode_documents(["first doc", "second"])
    assert lengths.tolist() == [len(tok.encode("first doc")) + 2, len(tok.encode("second")) + 2]
    assert stream[0] == tok.bos_id and stream[lengths[0] - 1] == tok.eos_id and stream[lengths[0]] == tok.bos_id
    assert 0.2 < sub.train.n_tokens / sub.train.n_bytes < 0.5  # subword tokens, byte ~1.0
    assert 1.0 <= byte.train.n_tokens / byte.train.n_bytes < 1.01


# ---------------------------------------------------------------- NL-RX spans


def test_nlrx_target_spans_bytes_unchanged_and_subwords_through_offsets(bpe: HFTokenizer) -> None:
    ex = Example("lines with a vowel", "\\b[AEIOUaeiou]\\b", "Convert to regex.")
    byte = ByteTokenizer()
    ids, start = encode_example(ex, byte, system=True)
    # bytes: exactly the layout before subword tokenizers existed (answer bytes, then EOS for its newline)
    text = "<|system|>\nConvert to regex.\n<|user|>\nlines with a vowel\n<|assistant|>\n"
    assert ids == [256, *text.encode(), *ex.target.encode(), 257] and start == 1 + len(text.encode())
    ids, start = encode_example(ex, bpe, system=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert bpe.decode(ids[start:-1]) == ex.target  # the target tokens spell the answer, nothing else
    assert bpe.decode(ids[1:start]) == text  # the prompt, chat markers included
    assert ids[start - 2] == bpe.token_id("<|assistant|>")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fifth of kjv as JSONL documents: the same text, a fifth of the tokenizing time."""
    p = tmp_path_factory.mktemp("corpus") / "kjv.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in load_documents("kjv")[:240]))
    return p


def _run(out: Path, name: str, *extra: str) -> Path:
    argv = ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", *extra]
    assert train_cli.main(argv) == 0
    return out / name


BPE_ARGS = ("--tokenizer", "bpe:512", "--steps", "12", "--log-interval", "1", "--eval-interval", "5",
            "--warmup-steps", "2", "--stp.start-step", "3", "--stp.ramp-steps", "2")


@pytest.mark.slow
def test_bpe_run_resumes_bit_identically_without_retraining_and_samples(tmp_path: Path, corpus: Path, capsys,
                                                                        monkeypatch) -> None:
    full = _run(tmp_path, "full", *BPE_ARGS, "--data", str(corpus))
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["tokenizer"] == "bpe:512" and cfg["model"]["vocab_size"] == 512  # the vocabulary follows
    saved = (full / "tokenizer.json").read_text()
    for ck in [*list_checkpoints(full), full / "best"]:
        assert (ck / "tokenizer.json").read_text() == saved  # with every checkpoint
    part = _run(tmp_path, "part", *BPE_ARGS, "--data", str(corpus), "--stop-at", "7")

    def no_training(*a, **k):
        raise AssertionError("a resumed run retrained its tokenizer")

    monkeypatch.setattr(tokenizer_io, "train_bpe", no_training)
    assert train_cli.main(["--resume", str(part), "--no-progress"]) == 0
    monkeypatch.undo()
    lines = [[json.loads(x) for x in (r / "log.jsonl").read_text().splitlines() if '"ce"' in x] for r in (full, part)]
    assert [(a["step"], a["loss"], a["stp"]) for a in lines[0]] == [(b["step"], b["loss"], b["stp"]) for b in lines[1]]
    (w1, o1, _), (w2, o2, _) = read_checkpoint(full), read_checkpoint(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(o1[k], o2[k]) for k in o1)
    assert (part / "step_000012" / "tokenizer.json").read_text() == saved
    # --init: a new run from these weights takes their tokenizer and vocabulary, not the default bytes
    ft = _run(tmp_path, "ft", "--init", str(full), "--steps", "2", "--eval-interval", "2", "--data", str(corpus))
    ft_cfg = json.loads((ft / "config.json").read_text())
    assert ft_cfg["tokenizer"] == str(full / "step_000012" / "tokenizer.json")
    assert ft_cfg["model"]["vocab_size"] == 512 and (ft / "step_000002" / "tokenizer.json").read_text() == saved

    # amer sample decodes with the checkpoint's tokenizer: readable text, not bytes of BPE ids
    capsys.readouterr()
    argv = ["sample", "--checkpoint", str(full), "--prompt", "And God said", "--temperature", "0",
            "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    new = out[len("And God said"):].rstrip("\n")
    assert out.startswith("And God said") and new.strip() and "\ufffd" not in new and new.isprintable()
    assert any(c.isalpha() for c in new)
    # negative control: without its tokenizer.json the checkpoint is read as bytes and says something else
    ck = list_checkpoints(full)[-1]
    shutil.move(ck / "tokenizer.json", tmp_path / "kept.json")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out != out


def test_user_tokenizer_json_trains_and_is_saved(tmp_path: Path, corpus: Path) -> None:
    words = load_documents("kjv")[:20]
    p = tmp_path / "tok.json"
    _user_tokenizer(["<s>", "</s>", "<pad>"], words).save(str(p))
    run = _run(tmp_path, "user", "--tokenizer", str(p), "--steps", "2", "--eval-interval", "2", "--data", str(corpus))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["tokenizer"] == str(p) and cfg["model"]["vocab_size"] == 320  # 300 tokens -> a multiple of 64
    ck = list_checkpoints(run)[-1]
    assert json.loads((ck / "tokenizer.json").read_text()) == json.loads(p.read_text())
    assert isinstance(load_tokenizer(ck), HFTokenizer)


def test_tokenizer_cannot_change_on_resume(tmp_path: Path) -> None:
    from amer.training.loop import train

    run = _run(tmp_path, "r", "--steps", "2", "--eval-interval", "2", "--stop-at", "1")
    cfg, _ = train_cli.resolve_config(["--resume", str(run), "--tokenizer", "bpe:300", "--no-progress"])
    with pytest.raises(ConfigError, match="keeps its tokenizer"):
        train(cfg, quiet=True)
    cfg, _ = train_cli.resolve_config(["--resume", str(run), "--no-progress"])  # control: unchanged resumes
    assert train(cfg, quiet=True)["steps"] == 2


def test_added_pad_is_a_special_token() -> None:
    wrapped = HFTokenizer(_user_tokenizer(["</s>"], ["x y z"] * 3), "t")
    assert wrapped.hf.id_to_token(wrapped.pad_id) == "<|pad|>" and wrapped.pad_id != wrapped.eos_id
    assert wrapped.decode([wrapped.pad_id, *wrapped.encode("x y")]) == "x y"  # dropped when decoding
    assert wrapped.encode("x <|pad|>")[-1] == wrapped.pad_id  # and matched as one token in text


# ---------------------------------------------------------------- bits per byte


def test_token_bytes_add_up_to_the_texts_utf8_bytes(bpe: HFTokenizer) -> None:
    # amer's byte map is the tokenizers library's ByteLevel alphabet: one character per byte
    assert set(hftok._bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    for tok in (ByteTokenizer(), bpe):
        table = tok.token_bytes()
        assert len(table) == tok.vocab_size
        assert all(table[i] == 0 for i in (tok.bos_id, tok.eos_id, tok.pad_id))
        for text in TEXTS[:4]:  # multi-byte characters split across BPE tokens included: exact, not per character
            ids = tok.encode(text, bos=True, eos=True)
            assert sum(table[i] for i in ids) == len(text.encode("utf-8")), (tok, text)
    markers = [bpe.token_id(m) for m in hftok.CHAT_MARKERS]
    assert all(m is not None and bpe.token_bytes()[m] == 0 for m in markers)  # template, not text


def test_token_bytes_of_a_sentencepiece_style_file_count_spaces_and_fallback_bytes() -> None:
    """Llama-2 / Mistral style: word-start ``\u2581`` pieces, raw-byte ``<0xNN>`` tokens, a decoder that strips
    the text's first space. Decoded alone, ``\u2581the`` would lose its space and ``\u2581`` would be empty."""
    words = ["the", "cat", "sat", "on", "mat"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in sorted(set("".join(words)) | {"\u2581"}):
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in words:
        cur = "\u2581"
        for c in w:
            merges.append((cur, c))
            cur += c
            vocab.setdefault(cur, len(vocab))
    hf = Tokenizer(models.BPE(vocab, list(dict.fromkeys(merges)), byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = HFTokenizer(hf, "sp")
    table = tok.token_bytes()
    assert table[vocab["\u2581the"]] == 4 and table[vocab["\u2581"]] == 1 and table[vocab["<0xC3>"]] == 1
    text = "the cat sat on the mat \u00e9"  # the accent is not in the vocabulary: two fallback bytes
    ids = tok.encode(text)
    assert tok.decode(ids) == text and "<0xA9>" in [hf.id_to_token(i) for i in ids]
    assert sum(table[i] for i in ids) == len(text.encode("utf-8")) + 1  # + the first word's stripped space


def test_val_bpb_is_the_text_targets_ce_in_bits_per_byte(bpe: HFTokenizer) -> None:
    from amer import HybridLM, ModelConfig
    from amer.training import evaluate

    torch.manual_seed(0)
    docs = ["And God said, Let there be light: and there was light.", "naïve café ✓ 日本語 and more text"]
    for tok in (ByteTokenizer(), bpe):
        model = HybridLM(ModelConfig(pattern="AM", d_model=32, vocab_size=model_vocab_size(tok), max_seq_len=128))
        rows = [tok.encode(d, bos=True, eos=True) for d in docs]
        n = max(len(r) for r in rows)
        tokens = torch.tensor([r + [tok.pad_id] * (n - len(r)) for r in rows])[:, :-1]
        targets = torch.tensor([r[1:] + [-100] * (n - len(r)) for r in rows])
        batch = {"tokens": tokens, "targets": targets}
        table = torch.tensor(tok.token_bytes())
        res = evaluate(model, [batch], token_bytes=table)
        with torch.no_grad():
            logits = model(tokens).logits.float()
        per = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        real = targets.flatten() >= 0
        text = real & (table[targets.flatten().clamp(min=0)] > 0)
        nbytes = sum(len(tok.decode(r[1:]).encode()) for r in rows)  # the text the targets spell
        assert int(table[targets.flatten()[text]].sum()) == nbytes
        assert res["bpb"] == pytest.approx(float(per[text].sum()) / np.log(2) / nbytes, rel=1e-5)
        assert res["loss"] == pytest.approx(float(per[real].mean()), rel=1e-5)
        # negative control: counting the EOS targets too gives another number
        assert abs(res["bpb"] - float(per[real].sum()) / np.log(2) / nbytes) > 1e-3
        assert "bpb" not in evaluate(model, [batch])  # asked for only with a table
