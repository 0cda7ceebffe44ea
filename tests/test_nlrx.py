"""Tests for amer.experiments.nlrx: loader, loss and STP masks, decoding, scoring, statistics, verdicts, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from chat_data import SHARED, SYSTEM, write_chat_data
from chat_data import chat_row as _row

import amer.cli.experiment_nlrx as nlrx_cli
from amer.analysis.stats import betainc, effective_rank, paired_ttest, t_two_sided_p
from amer.data import ByteTokenizer, DataError, render_chat
from amer.experiments import nlrx
from amer.experiments.nlrx import Example, ExampleSet, encode_example, exact_match, load_examples
from amer.generate import decode
from amer.model import HybridLM
from amer.stp import compute_stp_loss, sample_spans

TOK = ByteTokenizer()
EXAMPLES = [
    Example("lines with a vowel", "([AEIOUaeiou])", SYSTEM),
    Example("lines containing the string 'dog' or a number, 3 or more times", "((dog)|([0-9])){3,}", SYSTEM),
    Example("lines with café", "(.*café.*)", None),  # non-ASCII: bytes, not characters, must line up
    Example("x", "a", SYSTEM),
]


# ---------------------------------------------------------------- loader


def test_loader_reads_chat_rows(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(_row("lines with a vowel", "([AEIOUaeiou])") + "\n\n" + _row("a b", "(b)", system=False) + "\n")
    exs = load_examples(p)
    assert exs == [Example("lines with a vowel", "([AEIOUaeiou])", SYSTEM), Example("a b", "(b)", None)]
    assert load_examples(p, limit=1) == exs[:1]


@pytest.mark.parametrize("line, needle", [
    ('{"messages": [', "line 1: invalid JSON"),
    ('{"text": "hello"}', 'expected a chat record'),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "r"}]}', "no user turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "r"}]}', "message 0"),
])
def test_loader_rejects_bad_rows_with_one_line(tmp_path: Path, line: str, needle: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(DataError, match=needle) as e:
        load_examples(p)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not (SHARED / nlrx.TRAIN_FILE).is_file(), reason="shared NL-RX-SYNTH copy not present")
def test_loader_on_the_real_files() -> None:
    train = load_examples(SHARED / nlrx.TRAIN_FILE)
    test = load_examples(SHARED / nlrx.TEST_FILE)
    assert (len(train), len(test)) == (8000, 2000)
    first = json.loads((SHARED / nlrx.TRAIN_FILE).open().readline())["messages"]
    assert train[0] == Example(first[1]["content"], first[2]["content"], first[0]["content"])


def test_encoding_is_the_chat_template_plus_target_and_eos() -> None:
    for ex in EXAMPLES:
        for system in (False, True):
            ids, start = encode_example(ex, TOK, system=system)
            turns = ([{"role": "system", "content": ex.system}] if system and ex.system else [])
            turns.append({"role": "user", "content": ex.prompt})
            # the generation prompt is exactly what render_chat gives for sampling an answer
            assert ids[:start] == [TOK.bos_id] + TOK.encode(render_chat(turns, add_generation_prompt=True))
            assert ids[start:] == TOK.encode(ex.target) + [TOK.eos_id]


# ---------------------------------------------------------------- loss mask and STP mask


def test_loss_positions_are_exactly_target_tokens_and_eos() -> None:
    ds = ExampleSet(EXAMPLES, TOK, system=True, indices=[10, 11, 12, 13])
    b = ds.batch([0, 1, 2, 3])
    B, T = b["tokens"].shape
    assert T == max(len(s) for s in ds.seqs) - 1
    for r in range(B):
        seq, start = ds.seqs[r], ds.starts[r]
        n = len(seq) - 1
        tgt = b["targets"][r]
        pos = (tgt != -100).nonzero().flatten().tolist()
        assert pos == list(range(start - 1, n))  # the positions whose next token is target or EOS
        assert tgt[pos].tolist() == TOK.encode(EXAMPLES[r].target) + [TOK.eos_id]
        assert b["tokens"][r, :n].tolist() == seq[:-1]  # inputs: every real token but the last (EOS)
        assert (b["tokens"][r, n:] == TOK.pad_id).all() and (tgt[n:] == -100).all()
        assert (b["doc_ids"][r, :n] == ds.indices[r]).all() and (b["doc_ids"][r, n:] == -1).all()
    # the loss cannot see the prompt: scrambling logits outside target positions changes nothing
    logits = torch.randn(B, T, TOK.vocab_size)
    other = logits.clone()
    other[b["targets"] == -100] = torch.randn_like(other[b["targets"] == -100])
    from amer.objective import cross_entropy
    assert torch.equal(cross_entropy(logits, b["targets"]), cross_entropy(other, b["targets"]))


def test_stp_spans_never_leave_an_example_or_touch_padding() -> None:
    exs = EXAMPLES * 4
    ds = ExampleSet(exs, TOK, indices=list(range(100, 100 + len(exs))))
    b = ds.batch(list(range(len(exs))))
    mask = b["doc_ids"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx, w = sample_spans(*mask.shape, 32, mask=mask, generator=gen)  # (B, S, 3), (B, S)
        ids = mask.gather(1, idx.flatten(1)).view_as(idx)  # doc id at each sampled position
        live = w > 0
        assert live.all()  # every example has >= 3 real tokens, so no placeholder spans
        assert (ids[live] >= 0).all()  # never padding
        assert (ids[live] == ids[live][:, :1]).all()  # one example per triple
        assert (ids[:, :, 0] == torch.tensor(ds.indices)[:, None]).all()  # and it is the row's example
        toks = b["tokens"].gather(1, idx.flatten(1))
        assert (toks != TOK.pad_id).all()
    # and the loss itself is blind to whatever sits in the padding
    h = torch.randn(*mask.shape, 8)
    h2 = h.clone()
    h2[mask < 0] = 1e3 * torch.randn_like(h2[mask < 0])
    l1 = compute_stp_loss(h, 16, mask=mask, generator=torch.Generator().manual_seed(1))
    l2 = compute_stp_loss(h2, 16, mask=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2)


# ---------------------------------------------------------------- scoring and decoding


@pytest.mark.parametrize("pred, ref, ok", [
    ("(dog){3,}", "(dog){3,}", True),
    ("(dog){3,}\n", "(dog){3,}", True),  # surrounding whitespace (the template newline) is forgiven
    ("  (dog){3,} ", "(dog){3,}", True),
    ("(dog) {3,}", "(dog){3,}", False),  # inner whitespace is part of the regex
    ("(DOG){3,}", "(dog){3,}", False),  # case counts
    ("[0-9]", "\\d", False),  # equivalent but spelled differently: wrong, as in the paper
    ("", "(dog)", False),
    ("(dog){3,}x", "(dog){3,}", False),
])
def test_exact_match(pred: str, ref: str, ok: bool) -> None:
    assert exact_match(pred, ref) is ok


def _tiny_model(pattern: str = "AMER") -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(nlrx.model_config(pattern, 32, max_seq_len=128)).eval()


@pytest.mark.parametrize("pattern", ["AMER", "(AE)*2"])
def test_mixed_length_greedy_decode_matches_generate(pattern: str) -> None:
    model = _tiny_model(pattern)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 7, 5, 12)]
    free = model.generate(torch.tensor([prompts[0]]), 12, temperature=0)[0, 5:].tolist()
    eos = max(set(free), key=free.count)  # a token the model does emit, so some rows stop early
    got = decode(model, prompts, 12, eos_id=eos)  # what the experiment's greedy evaluation runs
    for p, row in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), 12, temperature=0, eos_id=eos)[0, len(p):].tolist()
        assert row == (ref[: ref.index(eos) + 1] if eos in ref else ref)  # up to and including EOS
    assert any(len(r) < 12 for r in got)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 2.5, 12.7062, 100.0])
def test_t_p_value_matches_closed_forms(t: float) -> None:
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)  # Cauchy
    assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


@pytest.mark.parametrize("t, df, p", [
    (12.706204736, 1, 0.05), (4.302652730, 2, 0.05), (2.776445105, 4, 0.05), (2.228138852, 10, 0.05),
    (3.169272673, 10, 0.01), (1.959963985, 1e7, 0.05), (0.0, 5, 1.0),
])
def test_t_p_value_matches_tables(t: float, df: float, p: float) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6, abs=1e-12)


def test_betainc_identities() -> None:
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert betainc(2.5, 0.5, x) == pytest.approx(1 - betainc(0.5, 2.5, 1 - x), abs=1e-12)
        assert betainc(2, 1, x) == pytest.approx(x * x, abs=1e-13)


def test_paired_ttest_by_hand() -> None:
    t, p = paired_ttest([0.5, 0.6, 0.7], [0.4, 0.45, 0.65])  # d = .1, .15, .05: mean .1, sd .05
    assert t == pytest.approx(0.1 / (0.05 / math.sqrt(3)))
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t))  # df 2 closed form = 0.07418
    assert paired_ttest([0.3, 0.4], [0.3, 0.4]) == (0.0, 1.0)
    assert paired_ttest([0.5, 0.6], [0.3, 0.4])[1] == 0.0
    assert paired_ttest([0.5], [0.3]) == (None, None)


def test_effective_rank_extremes() -> None:
    assert effective_rank(torch.randn(50, 1) @ torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)


# ---------------------------------------------------------------- verdicts are computed from the numbers


def _records(acc: dict, stp_final: dict, ce: dict, seeds=(0, 1, 2), spread: float = 0.01) -> list[dict]:
    recs = []
    for (lam, taps, frac), a in acc.items():
        for k, seed in enumerate(seeds):
            recs.append({"arm": {"model": "m", "pattern": "AMER", "lam": lam, "taps": taps, "fraction": frac,
                                 "seed": seed},
                         "accuracy": a + spread * k, "heldout_ce": ce.get(lam, 0.5),
                         "heldout_stp_final": stp_final.get(lam, 1.0),
                         "heldout_stp_family": 1.0, "erank": 10.0, "train_ce": 0.1})
    return recs


def _settings(tmp_path: Path) -> nlrx.Settings:
    return nlrx.Settings(data_dir=str(tmp_path), out=str(tmp_path), models=[("m", "AMER")], lambdas=[0, 0.02, 0.08],
                         taps=["final"], fractions=["1", "1/16"], seeds=[0, 1, 2])


def test_verdicts_follow_the_numbers(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    stp, ce = {0: 1.0, 0.02: 0.8, 0.08: 0.5}, {0: 0.50, 0.02: 0.505, 0.08: 0.51}
    good = {(0.0, "ntp", "1"): 0.60, (0.0, "ntp", "1/16"): 0.20,
            (0.02, "final", "1"): 0.62, (0.02, "final", "1/16"): 0.61,
            (0.08, "final", "1"): 0.55, (0.08, "final", "1/16"): 0.30}
    v = nlrx.summarize(_records(good, stp, ce), s)["verdicts"]["m"]
    assert v["data_efficiency"]["status"] == "reproduced"
    assert v["figure_4b"]["status"] == "reproduced"
    assert v["figure_4b"]["by_taps"]["final"]["ce_flat_up_to"] == 0.08
    # CE that rises past 5% at the largest lambda: STP still falls, the mechanism is only flat below it
    v = nlrx.summarize(_records(good, stp, {0: 0.50, 0.02: 0.51, 0.08: 0.70}), s)["verdicts"]["m"]
    assert v["figure_4b"]["status"] == "not reproduced"
    assert v["figure_4b"]["by_taps"]["final"]["ce_flat_up_to"] == 0.02
    assert "within 5% of NTP's up to lambda 0.02" in v["figure_4b"]["text"]
    bad = dict(good)
    bad[(0.02, "final", "1/16")] = 0.25
    flat_stp = {0: 1.0, 0.02: 1.01, 0.08: 0.99}
    summary = nlrx.summarize(_records(bad, flat_stp, ce), s)
    v = summary["verdicts"]["m"]
    assert v["data_efficiency"]["status"] == "not reproduced"
    assert v["figure_4b"]["status"] == "not reproduced"
    assert "m: data-efficiency effect: NOT REPRODUCED" in summary["statement"]
    row = next(r for r in summary["rows"] if r["lam"] == 0.02 and r["fraction"] == "1/16")
    assert row["diff_vs_ntp"] == pytest.approx(0.05) and row["p_vs_ntp"] == 0.0  # constant paired difference
    # a baseline that barely learned the task cannot show a data saving, however STP compares
    tiny = {k: 0.0 for k in good} | {(0.0, "ntp", "1"): 0.015, (0.02, "final", "1/16"): 0.015}
    v = nlrx.summarize(_records(tiny, stp, ce, spread=0.0), s)["verdicts"]["m"]
    assert v["data_efficiency"]["status"] == "inconclusive" and "too little" in v["data_efficiency"]["text"]


# ---------------------------------------------------------------- command line, end to end


def test_missing_data_dir_is_one_line_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from amer.cli import main as cli_main

    monkeypatch.setenv(nlrx.ENV_DIR, str(tmp_path / "nowhere"))
    assert cli_main(["experiment", "nlrx", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "synth_train.jsonl" in err and "\n" not in err
    assert nlrx_cli.main(["--data-dir", str(tmp_path), "--lambdas", "0,x"]) == 2
    assert nlrx_cli.main(["--data-dir", str(tmp_path), "--bogus"]) == 2


def test_bad_data_with_workers_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    data = write_chat_data(tmp_path / "data")
    with open(data / nlrx.TRAIN_FILE, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "out"
    assert nlrx_cli.main(["--quick", "--data-dir", str(data), "--out", str(out), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and nlrx.TRAIN_FILE in err and "\n" not in err
    assert not (out / "arms").exists() or not list((out / "arms").glob("*.json"))


def test_default_data_dir_prefers_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(nlrx.ENV_DIR, str(tmp_path))
    assert nlrx.default_data_dir() == tmp_path
    monkeypatch.delenv(nlrx.ENV_DIR)
    d = nlrx.default_data_dir()
    assert d is None or (d / nlrx.TRAIN_FILE).is_file()


def test_grid_shape_and_ids(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    s.taps = ["final", "family"]
    grid = nlrx.build_grid(s)
    assert len(grid) == 3 * 2 * (1 + 2 * 2)  # seeds x fractions x (NTP + lambdas x taps)
    assert len({a.id for a in grid}) == len(grid)
    assert grid[0].id == "m_lam0_ntp_f1_s0"
    s.lambdas_small = [0.0, 0.02]  # the sweep only at the largest fraction
    grid = nlrx.build_grid(s)
    assert len(grid) == 3 * ((1 + 2 * 2) + (1 + 1 * 2))
    assert {a.lam for a in grid if a.fraction == "1/16"} == {0.0, 0.02}
    # nested subsets: each seed's 1/16 lies inside its full set; seeds differ
    small, small1 = nlrx.subset_rows(8000, "1/16", 0), nlrx.subset_rows(8000, "1/16", 1)
    assert len(small) == 500 and set(small) <= set(nlrx.subset_rows(8000, "1/4", 0)) and small != small1


def test_length_bucketed_batches_cover_each_epoch_with_little_padding() -> None:
    exs = [Example("p" * (i % 37), "r" * (1 + i % 11)) for i in range(200)]
    ds = ExampleSet(exs, TOK, indices=list(range(200)))
    it = nlrx.LengthBucketedBatches(ds, 10, seed=5, pool=4)
    seen, real, total = [], 0, 0
    for _ in range(40):  # 400 rows = exactly 2 epochs
        b = next(it)
        seen += b["doc_ids"][:, 0].tolist()
        real += int((b["doc_ids"] >= 0).sum())
        total += b["doc_ids"].numel()
    assert sorted(seen) == sorted(list(range(200)) * 2)  # every row once per epoch
    assert real / total > 0.9
    again = nlrx.LengthBucketedBatches(ds, 10, seed=5, pool=4)
    assert torch.equal(next(again)["tokens"], next(nlrx.LengthBucketedBatches(ds, 10, seed=5, pool=4))["tokens"])


@pytest.mark.slow
def test_quick_end_to_end_and_resume(tmp_path: Path, capsys) -> None:
    data = write_chat_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--quick", "--data-dir", str(data), "--out", str(out), "--steps", "4", "--d-model", "32",
            "--test-rows", "8", "--max-new-tokens", "8", "--workers", "2"]
    assert nlrx_cli.main(argv) == 0
    text = capsys.readouterr().out
    arms = sorted(p.name for p in (out / "arms").glob("*.json"))
    assert arms == ["hybrid_lam0.02_family_f1_s0.json", "hybrid_lam0_ntp_f1_s0.json"]
    res = json.loads((out / "results.json").read_text())
    assert {r["lam"] for r in res["rows"]} == {0.0, 0.02}
    rec = json.loads((out / "arms" / arms[0]).read_text())
    assert rec["n_test"] == 8 and 0 <= rec["accuracy"] <= 1 and rec["stp_selector"] == "A-1,M-1,E-1,R-1"
    assert rec["train_stp"] is not None and rec["heldout_stp_family"] > 0
    assert (out / "results.png").stat().st_size > 0
    assert "hybrid: data-efficiency effect: UNTESTED" in (out / "results.md").read_text()
    assert "2 to run" in text and "data: 48 train / 8 test examples" in text
    # resumable: a second run trains nothing and leaves the arm files alone
    mtime = (out / "arms" / arms[0]).stat().st_mtime_ns
    assert nlrx_cli.main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert (out / "arms" / arms[0]).stat().st_mtime_ns == mtime
    # results from other settings are never mixed in silently
    assert nlrx_cli.main([*argv, "--workers", "1"]) == 0  # parallelism is not a setting that changes results
    capsys.readouterr()
    assert nlrx_cli.main([*argv, "--max-new-tokens", "9"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / nlrx.TRAIN_FILE).is_file(), reason="shared NL-RX-SYNTH copy not present")
def test_real_quick_run_on_the_shared_data_learns_the_task(tmp_path: Path, capsys) -> None:
    """``amer experiment nlrx --quick`` exactly as a user runs it (only the output folder moved): both arms
    train on the real data, and the NTP arm learns enough to be a usable baseline (the untrained model
    scores 0 exact match; ~13% after the quick run's 600 steps on 2000 rows)."""
    out = tmp_path / "quick"
    assert nlrx_cli.main(["--quick", "--out", str(out)]) == 0
    capsys.readouterr()
    ntp = json.loads((out / "arms" / "hybrid_lam0_ntp_f1_s0.json").read_text())
    stp = json.loads((out / "arms" / "hybrid_lam0.02_family_f1_s0.json").read_text())
    assert ntp["n_test"] == stp["n_test"] == 200 and ntp["train_rows"] == 2000
    assert ntp["accuracy"] >= 0.05, ntp["accuracy"]
    assert stp["train_stp"] is not None and ntp["train_stp"] is None
    assert stp["train_ce"] < 1.0 and ntp["train_ce"] < 1.0  # far below the ~5.5 nats of a uniform byte guess
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "results.png", "arms"}
