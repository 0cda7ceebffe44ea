"""``amer experiment nlrx-finetune``: the content mask and targets of the chat batches, the decision rule and gate
of the report, and the command end to end (tiny synthetic data: pretraining, gate, lr pick, grid, report,
resumption, stale refusal, --init); the real ``--quick`` on the shared data is slow-marked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from chat_data import SHARED, SYSTEM, write_chat_data

import amer.cli.experiment_nlrx_finetune as ft_cli
from amer.data import ByteTokenizer
from amer.experiments import nlrx
from amer.experiments.nlrx import Example
from amer.experiments.nlrx_finetune import ChatSet, Settings, summarize
from amer.experiments.nlrx_finetune.report import DECISION_RULE

TOK = ByteTokenizer()


def _write_data(d: Path) -> Path:
    return write_chat_data(d, phrase="lines with '{w}' {n} times")


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("system", [False, True])
def test_content_mask_is_the_user_and_answer_content_plus_the_state_before_each(system: bool) -> None:
    exs = [Example("lines with café", "(.*café.*)", SYSTEM), Example("x", "a", SYSTEM)]
    ds = ChatSet(exs, TOK, system=system)
    b = ds.batch([0, 1])
    for row, ex in enumerate(exs):
        tokens, content = b["tokens"][row], b["stp_content"][row]
        pos = content.nonzero().flatten().tolist()
        # two runs: [state before the description, description], [state before the regex, regex]
        runs = [[pos[0]]]
        for p in pos[1:]:
            runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p])
        assert len(runs) == 2
        desc = TOK.decode(tokens[runs[0][1] : runs[0][-1] + 1].tolist())
        regex = TOK.decode(tokens[runs[1][1] : runs[1][-1] + 1].tolist())
        assert desc == ex.prompt and regex == ex.target
        assert TOK.decode(tokens[runs[0][0] : runs[0][0] + 1].tolist()) == "\n"  # the template's last byte
        n = int((b["doc_ids"][row] >= 0).sum())
        assert runs[1][-1] == n - 1  # the last input is the regex's last byte; EOS is only a target
        assert not content[b["doc_ids"][row] < 0].any()


def test_ntp_targets_all_or_answer() -> None:
    exs = [Example("lines with a vowel", "([AEIOUaeiou])", SYSTEM)]
    ans = ChatSet(exs, TOK, ntp="assistant").batch([0])
    every = ChatSet(exs, TOK, ntp="all").batch([0])
    n = int((every["doc_ids"] >= 0).sum())
    assert bool((every["targets"][0, :n] != -100).all())
    assert torch.equal(every["targets"][0, : n - 1], every["tokens"][0, 1:n])  # next token everywhere
    k = int((ans["targets"] != -100).sum())
    assert k == len(exs[0].target.encode()) + 1  # the answer and its EOS only
    assert torch.equal(ans["stp_content"], every["stp_content"])
    with pytest.raises(Exception, match="ntp-targets"):
        ChatSet(exs, TOK, ntp="prompt")
    sub = ChatSet(exs * 3, TOK, ntp="all").subset([2, 0])
    assert isinstance(sub, ChatSet) and "stp_content" in sub.batch([0, 1])


# ---------------------------------------------------------------- report: gate and decision rule


def _settings(**kw) -> Settings:
    base = dict(train_file="t", test_file="u", data_name="NL-RX-SYNTH", out="o", models=[("m", "AM")],
                lambdas=[0.0, 0.02], fractions=["1", "1/16"], seeds=[0, 1, 2], triple_lambda=None)
    return Settings(**{**base, **kw})


def _rec(init: str, form: str, lam: float, frac: str, seed: int, acc: float, stp: float = 1.4) -> dict:
    return {"arm": {"init": init, "model": "m", "pattern": "AM", "form": form, "lam": lam, "fraction": frac,
                    "seed": seed, "lr": 1e-3}, "accuracy": acc, "heldout_ce": 0.5, "heldout_stp_span": stp,
            "heldout_stp_triple": 1.3, "erank": 30.0, "train_ce": 0.4}


def _res(pre_small_stp: list[float], pre_full_ntp: list[float], pre_small_ntp: list[float], gate_pre: float) -> dict:
    recs = []
    for sd in range(3):
        for init in ("pretrained", "scratch"):
            recs += [_rec(init, "ntp", 0.0, "1", sd, pre_full_ntp[sd]), _rec(init, "ntp", 0.0, "1/16", sd,
                                                                             pre_small_ntp[sd]),
                     _rec(init, "span", 0.02, "1", sd, pre_full_ntp[sd]),
                     _rec(init, "span", 0.02, "1/16", sd, pre_small_stp[sd])]
    gate = {"models": {"m": {"pretrained": {"heldout_stp_span": gate_pre}, "random_init": {"heldout_stp_span": 1.38}}}}
    return {"records": recs, "picks": [], "gate": gate, "lrs": {("pretrained", "m"): 1e-3}, "pretrain": {}}


def test_decision_rule_reproduced_not_reproduced_and_gate() -> None:
    s = _settings()
    # STP at 1/16 reaches NTP at all the data, which itself beats NTP at 1/16: reproduced
    yes = summarize(_res([0.5, 0.6, 0.55], [0.5, 0.55, 0.55], [0.2, 0.2, 0.25], gate_pre=1.0), s)
    assert yes["gate"]["m"]["status"] == "passed" and yes["decisions"]["pretrained/m"]["status"] == "reproduced"
    assert "REPRODUCED" in yes["statement"] and "NOT" not in yes["statement"].split("Control")[0]
    # negative control: STP at 1/16 stays below
    no = summarize(_res([0.3, 0.3, 0.3], [0.5, 0.55, 0.55], [0.2, 0.2, 0.25], gate_pre=1.0), s)
    assert no["decisions"]["pretrained/m"]["status"] == "not reproduced" and "NOT REPRODUCED" in no["statement"]
    # no data-size effect at all (everything 0): reaching NTP proves nothing
    flat = summarize(_res([0.0] * 3, [0.0] * 3, [0.0] * 3, gate_pre=1.0), s)
    assert flat["decisions"]["pretrained/m"]["status"] == "not reproduced"
    assert not flat["decisions"]["pretrained/m"]["informative"]
    # gate: pretrained trajectories no straighter than the from-scratch NTP model's (1.4): no verdict
    gated = summarize(_res([0.5, 0.6, 0.55], [0.5, 0.55, 0.55], [0.2, 0.2, 0.25], gate_pre=1.35), s)
    assert gated["gate"]["m"]["status"] == "failed"
    assert "GATE FAILED" in gated["statement"] and "no verdict" in gated["statement"]
    assert gated["decision_rule"] == DECISION_RULE


def test_gate_level_is_the_from_scratch_ntp_model_at_the_picked_lr_once_per_seed() -> None:
    s = _settings()
    res = _res([0.5, 0.6, 0.55], [0.5, 0.55, 0.55], [0.2, 0.2, 0.25], gate_pre=1.0)
    key = ("scratch", "ntp", "1")
    grid = [r for r in res["records"] if (r["arm"]["init"], r["arm"]["form"], r["arm"]["fraction"]) == key]
    for r, stp in zip(grid, (1.5, 1.6, 1.7)):
        r["heldout_stp_span"] = stp
    # the pick: a barely trained arm at another rate, and the seed-0 arm the grid reuses
    slow = {**_rec("scratch", "ntp", 0.0, "1", 0, 0.0, stp=1.0), "arm": {**grid[0]["arm"], "lr": 1e-4}}
    res = {**res, "picks": [slow, grid[0]], "lrs": {**res["lrs"], ("scratch", "m"): 1e-3}}
    g = summarize(res, s)["gate"]["m"]
    assert g["n_scratch"] == 3 and g["scratch_ntp"] == pytest.approx(1.6)
    # negative control: every matching record averaged, as the gate once did, lands elsewhere
    naive = [r["heldout_stp_span"] for r in res["picks"] + res["records"]
             if (r["arm"]["init"], r["arm"]["form"], r["arm"]["fraction"]) == key]
    assert len(naive) == 5 and sum(naive) / 5 < 1.5


# ---------------------------------------------------------------- command line, end to end

TINY = ["--quick", "--models", "h=AM", "--d-model", "16", "--pretrain-max-bytes", "3000", "--lambdas", "0,0.02",
        "--fractions", "1,1/4", "--seeds", "2", "--lrs", "3e-3", "--epochs", "1", "--workers", "1",
        "--train-rows", "32", "--test-rows", "6"]


def test_missing_data_is_one_line_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from amer.cli import main as cli_main

    monkeypatch.setenv(nlrx.ENV_DIR, str(tmp_path / "nowhere"))
    assert cli_main(["experiment", "nlrx-finetune", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "synth_train.jsonl" in err and "\n" not in err
    d = _write_data(tmp_path / "d")
    assert ft_cli.main(["--data-dir", str(d), "--lambdas", "0,x"]) == 2
    assert ft_cli.main(["--data-dir", str(d), "--inits", "warm"]) == 2
    assert ft_cli.main(["--data-dir", str(d), "--init", str(tmp_path / "no-such-checkpoint")]) == 2
    assert "no-such-checkpoint" in capsys.readouterr().err


def test_tiny_run_end_to_end_resumes_refuses_stale_and_fine_tunes_an_init(tmp_path: Path, capsys) -> None:
    d = _write_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = [*TINY, "--data-dir", str(d), "--out", str(out)]
    assert ft_cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "pretrain h: done" in log and "gate h" in log and "lr pick pretrained h: 0.003" in log
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "arms", "pretrain", "gate.json"}
    summary = json.loads((out / "results.json").read_text())
    assert summary["data"] == "NL-RX-SYNTH" and summary["gate"]["h"]["status"] in ("passed", "failed")
    forms = {(r["init"], r["form"]) for r in summary["rows"]}
    assert forms == {(i, f) for i in ("pretrained", "scratch") for f in ("ntp", "span", "triple")}
    md = (out / "results.md").read_text()
    assert md.index("## Decision rule") < md.index("## Results") < md.index("## Verdict")
    # span arms train the span form, the bridge arm the triple form; both forms are measured held-out
    span = json.loads((out / "arms" / "pretrained_h_lr0.003_span_lam0.02_f1_s0.json").read_text())
    assert span["train_stp"] is not None and span["heldout_stp_span"] > 0 and span["heldout_stp_triple"] > 0
    # resumption: nothing is pretrained or trained again
    n_arms = len(list((out / "arms").glob("*.json")))
    assert ft_cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "0 to run" in log and "pretrain h:" not in log and len(list((out / "arms").glob("*.json"))) == n_arms
    # a setting that changes results is refused, not mixed in
    assert ft_cli.main([*argv, "--epochs", "2"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert ft_cli.main([*argv, "--report-only"]) == 0
    # other data files are named as such; --init fine-tunes a given checkpoint (here the one just pretrained)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tr.jsonl").write_text((d / nlrx.TRAIN_FILE).read_text())
    (other / "te.jsonl").write_text((d / nlrx.TEST_FILE).read_text())
    out2 = tmp_path / "out2"
    argv2 = [*TINY, "--train-file", str(other / "tr.jsonl"), "--test-file", str(other / "te.jsonl"), "--out",
             str(out2), "--init", str(out / "pretrain" / "h" / "final"), "--inits", "pretrained", "--seeds", "1"]
    assert ft_cli.main(argv2) == 0
    capsys.readouterr()
    s2 = json.loads((out2 / "results.json").read_text())
    assert s2["data"] == "tr.jsonl / te.jsonl" and not (out2 / "pretrain").exists()
    assert {r["init"] for r in s2["rows"]} == {"pretrained"} and s2["settings"]["models"] == [["init", "AM"]]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / nlrx.TRAIN_FILE).is_file(), reason="shared NL-RX-SYNTH copy not present")
def test_real_quick_run_on_the_shared_data_is_under_three_minutes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "quick"
    t0 = time.perf_counter()
    assert ft_cli.main(["--quick", "--out", str(out)]) == 0
    took = time.perf_counter() - t0
    capsys.readouterr()
    assert took < 180, took
    s = json.loads((out / "results.json").read_text())
    assert s["data"] == "NL-RX-SYNTH" and len(s["rows"]) == 12
    g = s["gate"]["hybrid"]
    # even a few dozen pretraining steps straighten the trajectories relative to a random initialisation
    assert g["pretrained"] < g["random_init"]
