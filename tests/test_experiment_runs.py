"""What every experiment shares (``amer.experiments.options``, ``.runs``, ``.reporting``): command-line values,
arm records on disk (NaN round trip, stale refusal), the worker pool's failure path, and the seed-paired test."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amer.analysis.stats import paired_ttest
from amer.errors import ExperimentError
from amer.experiments import options, reporting, runs
from amer.report import write_json

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Settings(runs.GridSettings):
    lr: float = 1e-3

    def fingerprint(self) -> dict[str, Any]:
        return {"lr": self.lr, "data_sha": self.data_sha}


@dataclass(frozen=True)
class _Arm:
    id: str


def test_options_parse_and_refuse_in_one_line() -> None:
    assert options.floats("0.02,0,0.02", "--lambdas") == [0.0, 0.02]
    assert options.fractions("1/16,1,0.25") == ["1", "1/4", "1/16"]  # canonical, largest first
    assert options.seeds("3") == [0, 1, 2] and options.seeds("5,2,5") == [2, 5]
    assert options.models("h=AMER, d=(AE)*2", str) == [("h", "AMER"), ("d", "(AE)*2")]
    bad = [(lambda: options.floats("0,x", "--lambdas"), "--lambdas"),
           (lambda: options.floats("0", "--lrs", positive=True), "> 0"),
           (lambda: options.fractions("0"), "(0, 1]"), (lambda: options.fractions("a/b"), "not a fraction"),
           (lambda: options.seeds("0"), "count from 1"), (lambda: options.seeds("1,-2"), "2^63-1"),
           (lambda: options.models("AMER", str), "NAME=PATTERN"), (lambda: options.models("a=A,a=M", str), "distinct")]
    for call, needle in bad:
        with pytest.raises(ExperimentError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)

    def refuse(pattern: str) -> None:
        raise ExperimentError(f"bad pattern {pattern}")

    with pytest.raises(ExperimentError, match="bad pattern Q"):  # the check runs before anything trains
        options.models("x=Q", refuse)


def test_records_keep_diverged_arms_and_refuse_other_settings(tmp_path: Path) -> None:
    s = _Settings(out=str(tmp_path), data_sha={"train": "abc"})
    path = runs.arm_path(s, _Arm("a0"))
    rec = {"id": "a0", "settings": s.fingerprint(), "heldout_ce": math.nan, "erank": 3.5, "train_stp": None}
    path.parent.mkdir(parents=True)
    runs.write_record(path, rec, figures=("heldout_ce", "erank"))
    assert '"heldout_ce": null' in path.read_text()  # strict JSON: no NaN literal
    back = runs.read_record(path, s, figures=("heldout_ce", "erank"))
    assert math.isnan(back["heldout_ce"]) and back["erank"] == 3.5 and back["train_stp"] is None
    with pytest.raises(ExperimentError, match=r"lr: 0\.001 -> 0\.003") as e:
        runs.read_record(path, _Settings(out=str(tmp_path), lr=3e-3, data_sha={"train": "abc"}), figures=())
    assert "another --out" in str(e.value)


def test_a_worker_that_cannot_load_its_data_fails_the_run_instead_of_respawning(tmp_path: Path) -> None:
    # a pool replaces a worker whose initializer raises, forever: the run would hang with nothing printed
    script = textwrap.dedent(f"""
        from amer.experiments.nlrx import Arm, Settings, load_data, run_arm
        from amer.experiments.runs import run_arms
        s = Settings(data_dir={str(tmp_path / 'missing')!r}, out={str(tmp_path / 'out')!r}, models=[('h', 'AM')],
                     lambdas=[0.0], taps=['final'], fractions=['1'], seeds=[0, 1], workers=2)
        arms = [Arm('h', 'AM', 0.0, 'ntp', '1', seed) for seed in (0, 1)]
        run_arms(arms, s, run=run_arm, load_data=load_data, figures=(), describe=str, label='t')
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "missing" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_paired_difference_and_test_use_shared_seeds_only() -> None:
    recs = [{"arm": {"g": g, "seed": sd}, "accuracy": acc}
            for g, sd, acc in [("stp", 0, 0.5), ("stp", 1, 0.7), ("stp", 2, 0.4), ("ntp", 0, 0.4), ("ntp", 1, 0.5),
                               ("ntp", 3, 0.9)]]
    rows = reporting.group_rows(recs, ("g",), ("accuracy",))
    stp, ntp = rows[("stp",)], rows[("ntp",)]
    assert stp["seeds"] == [0, 1, 2] and stp["accuracy"]["values"] == [0.5, 0.7, 0.4]
    got = reporting.paired(stp, ntp)
    assert got["n_pairs"] == 2 and got["diff_vs_ntp"] == pytest.approx(0.15)
    assert got["p_vs_ntp"] == pytest.approx(paired_ttest([0.5, 0.7], [0.4, 0.5])[1])
    assert reporting.paired(stp, None) == {"diff_vs_ntp": None, "p_vs_ntp": None, "n_pairs": 0}


def test_paired_constant_difference_is_writable_json(tmp_path) -> None:
    # every seed 0.5 points better: t is infinite, which results.json cannot hold
    recs = [{"arm": {"g": g, "seed": sd}, "accuracy": acc + (0.005 if g == "stp" else 0.0)}
            for g in ("stp", "ntp") for sd, acc in [(0, 0.0), (1, 0.25), (2, 0.5)]]
    rows = reporting.group_rows(recs, ("g",), ("accuracy",))
    assert paired_ttest(rows[("stp",)]["accuracy"]["values"], rows[("ntp",)]["accuracy"]["values"])[0] == math.inf
    got = reporting.paired(rows[("stp",)], rows[("ntp",)])
    assert got["t_vs_ntp"] is None and got["p_vs_ntp"] == 0.0 and got["diff_vs_ntp"] == pytest.approx(0.005)
    assert reporting.p_cell(got).startswith("0 (same diff") and reporting.p_cell({"p_vs_ntp": None}) == "-"
    write_json(tmp_path / "r.json", got, compact_lists=False)
    with pytest.raises(ValueError, match="non-finite"):  # what the report met before
        write_json(tmp_path / "bad.json", {**got, "t_vs_ntp": math.inf}, compact_lists=False)
