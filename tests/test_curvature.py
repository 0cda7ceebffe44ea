"""Tests for the curvature report: the engine (amer/analysis/curvature.py), the comparison
(amer/analysis/compare.py), the report files (amer/report/curvature.py) and ``amer curvature``
(amer/cli/curvature.py).

The geometry tests feed hand-made taps with known answers through a fake model: every tap is
``(1 + t) * D_l`` (token t, depth l), so each tap is a straight line along the sequence (token
curvature 0) and the depth path ``D_l`` takes one right-angle turn at a chosen boundary (depth
curvature 1 there, 0 elsewhere). Scaling by ``1 + t`` changes no angle along depth, so every token
sees the same depth geometry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amer.analysis.compare import compare
from amer.analysis.curvature import evaluate
from amer.checkpoint import save_checkpoint
from amer.cli import main as cli_main
from amer.config import ModelConfig, to_dict
from amer.errors import AnalysisError
from amer.model import HybridLM, ModelOutput
from amer.pattern import parse_pattern
from amer.report.curvature import format_markdown, write_report
from amer.stp import stp_per_layer
from amer.tap import Tap, TapSet

PATTERN = "AEMR"
# boundaries of AEMR in depth order: position -> (name, type)
BOUNDARIES = [("embed->A0", "embed->A"), ("A0->E0", "A->E"), ("E0->M0", "E->M"), ("M0->R0", "M->R"),
              ("R0->final", "R->final")]


def depth_path(turn: int, n_taps: int = len(PATTERN) + 2, dim: int = 8) -> torch.Tensor:
    """(n_taps, D) states whose update into tap ``pos`` is e0 for ``pos <= turn`` and e1 after, so the only
    bend (a right angle) is at boundary ``turn``: boundary j compares the update into tap j (the embedding
    itself for j = 0) with the update into tap j + 1 (see depth_states)."""
    e0, e1 = torch.eye(dim)[0], torch.eye(dim)[1]
    states, x = [], torch.zeros(dim)
    for pos in range(n_taps):  # update into tap pos: e0 before the turn, e1 from it on
        x = x + (e1 if pos > turn else e0)
        states.append(x.clone())
    return torch.stack(states)


class GeometryModel(nn.Module):
    """Stands in for HybridLM: returns a ModelOutput whose taps are built from ``paths`` (n_taps, D)
    per sequence row (cycled), as ``(1 + t) * path`` plus an optional per-token term."""

    def __init__(self, paths: list[torch.Tensor], pattern: str = PATTERN, token_fn=None) -> None:
        super().__init__()
        self.paths = paths
        self.pattern = parse_pattern(pattern)
        self.token_fn = token_fn
        self.weight = nn.Parameter(torch.zeros(1))  # evaluate() reads the device from the parameters
        self.calls = 0

    def forward(self, tokens: torch.Tensor, *, taps: bool | str = True,
                doc_ids: torch.Tensor | None = None) -> ModelOutput:
        B, T = tokens.shape
        scale = (1.0 + torch.arange(T, dtype=torch.float32)).view(1, T, 1)
        rows = torch.stack([self.paths[(self.calls * B + b) % len(self.paths)] for b in range(B)])  # (B, n, D)
        self.calls += 1
        hidden = scale.unsqueeze(1) * rows.unsqueeze(2)  # (B, n_taps, T, D)
        if self.token_fn is not None:
            hidden = self.token_fn(hidden)
        taps = [Tap(-1, None, 0, hidden[:, 0], "embed")]
        for spec in self.pattern.layers:
            taps.append(Tap(spec.index, spec.family, spec.family_index, hidden[:, spec.index + 1]))
        taps.append(Tap(len(self.pattern.layers), None, 0, hidden[:, -1], "final"))
        return ModelOutput(torch.zeros(B, T, 4), TapSet(taps, self.pattern), {}, {})


def token_batches(n_batches: int = 2, batch: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 256, (batch, length), generator=g),
             "doc_ids": torch.zeros(batch, length, dtype=torch.long)} for _ in range(n_batches)]


def means(result: dict, section: str) -> dict:
    if section == "boundaries":
        return {b["name"]: b["depth"]["mean"] for b in result["boundaries"]}
    if section == "types":
        return {t: v["depth"]["mean"] for t, v in result["boundary_types"].items()}
    raise KeyError(section)


# ------------------------------------------------------------------------------------------------
# known geometry


@pytest.mark.parametrize("boundary", range(len(BOUNDARIES)))
def test_right_angle_turn_shows_at_exactly_that_boundary_with_its_type(boundary: int) -> None:
    model = GeometryModel([depth_path(turn=boundary)])
    res = evaluate(model, token_batches(), strides=(1, 2), n_bootstrap=50, progress=False)
    name, kind = BOUNDARIES[boundary]
    got = means(res, "boundaries")
    assert got[name] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(v) < 1e-5 for k, v in got.items() if k != name), got
    assert [b["type"] for b in res["boundaries"]] == [t for _, t in BOUNDARIES]
    assert means(res, "types")[kind] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(v) < 1e-5 for k, v in means(res, "types").items() if k != kind)
    # every sequence bends the same way: the interval collapses onto the value
    b = next(b for b in res["boundaries"] if b["name"] == name)
    assert b["depth"]["ci"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert b["depth_deg"]["mean"] == pytest.approx(90.0, abs=1e-3)  # the same bend in degrees
    assert res["boundary_types"][kind]["depth_deg"]["mean"] == pytest.approx(90.0, abs=1e-3)
    assert all(abs(x["depth_deg"]["mean"]) < 1e-3 for x in res["boundaries"] if x["name"] != name)
    assert b["depth"]["n"] == 2 * 4 * 16  # every token of every sequence is a depth trajectory


def test_straight_token_lines_have_zero_token_curvature_and_stp_everywhere() -> None:
    res = evaluate(GeometryModel([depth_path(turn=2)]), token_batches(), strides=(1, 3), n_bootstrap=20,
                   progress=False)
    assert [layer["tap"] for layer in res["layers"]] == ["embed", "A0", "E0", "M0", "R0", "final"]
    for layer in res["layers"]:
        for k in ("1", "3"):
            assert layer["token"][k]["mean"] == pytest.approx(0.0, abs=1e-5), layer["tap"]
        assert layer["stp"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert res["layers"][1]["token"]["1"]["n"] == 2 * 4 * (16 - 2)
    assert res["layers"][1]["token"]["3"]["n"] == 2 * 4 * (16 - 6)


def test_family_summaries_follow_the_turn() -> None:
    res = evaluate(GeometryModel([depth_path(turn=2)]), token_batches(), n_bootstrap=20, progress=False)
    fam = res["families"]
    assert list(fam) == ["A", "M", "E", "R"]
    assert fam["M"]["depth_in"]["mean"] == pytest.approx(1.0, abs=1e-5)  # E0->M0: M turns away from E
    assert fam["E"]["depth_out"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert fam["A"]["depth_in"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert fam["A"]["blocks"] == ["A0"]


def test_token_right_angle_at_one_token_gives_the_exact_mean_per_stride() -> None:
    """Every tap walks e0 up to token m, then e1: stride 1 sees one right angle in T - 2 triples; stride 2
    sees it once plus two 45-degree bends (1 - cos 45) in T - 4 triples."""
    T, m = 16, 6

    def corner(hidden: torch.Tensor) -> torch.Tensor:
        t = torch.arange(T, dtype=torch.float32)
        path = torch.zeros(T, hidden.shape[-1])
        path[:, 0] = t.clamp(max=m)
        path[:, 1] = (t - m).clamp(min=0)
        return path.expand_as(hidden).clone()

    res = evaluate(GeometryModel([depth_path(turn=2)], token_fn=corner), token_batches(length=T),
                   strides=(1, 2), n_bootstrap=20, progress=False)
    for layer in res["layers"]:
        assert layer["token"]["1"]["mean"] == pytest.approx(1.0 / (T - 2), abs=1e-6)
        assert layer["token"]["2"]["mean"] == pytest.approx((1.0 + 2 * (1 - 2**-0.5)) / (T - 4), abs=1e-6)


def test_document_ids_keep_triples_inside_documents() -> None:
    """Two straight documents packed in one row with a jump between them: straight only when the
    document ids are honoured."""
    T = 16

    def jump(hidden: torch.Tensor) -> torch.Tensor:
        shift = torch.zeros(T, hidden.shape[-1])
        shift[T // 2:, 3] = 100.0  # a jump sideways at the document boundary
        return hidden + shift.view(1, 1, T, -1)

    model = GeometryModel([depth_path(turn=2)], token_fn=jump)
    two_docs = token_batches(length=T)
    for b in two_docs:
        b["doc_ids"][:, T // 2:] = 1
    one_doc = token_batches(length=T)
    straight = evaluate(model, two_docs, n_bootstrap=20, progress=False)
    bent = evaluate(model, one_doc, n_bootstrap=20, progress=False)
    assert straight["layers"][2]["token"]["1"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert bent["layers"][2]["token"]["1"]["mean"] > 0.05


def test_mixed_sequences_give_a_pooled_mean_and_an_interval_around_it() -> None:
    """Half the sequences turn at A0->E0, half at M0->R0: each boundary is at 0.5 with a real CI."""
    model = GeometryModel([depth_path(turn=1), depth_path(turn=3)])
    res = evaluate(model, token_batches(n_batches=4), n_bootstrap=400, progress=False)
    b = {x["name"]: x["depth"] for x in res["boundaries"]}
    assert b["A0->E0"]["mean"] == pytest.approx(0.5, abs=1e-5)
    assert b["A0->E0"]["std"] == pytest.approx(0.5, abs=1e-4)  # std over tokens: half 0, half 1
    lo, hi = b["A0->E0"]["ci"]
    assert 0.2 < lo < 0.5 < hi < 0.8
    assert b["E0->M0"]["ci"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert res["n_sequences"] == 16


# ------------------------------------------------------------------------------------------------
# a real model: the STP figure is the training estimator; determinism


def tiny_model(pattern: str = PATTERN, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(ModelConfig.from_preset("tiny", pattern=pattern))


def test_stp_per_tap_is_the_training_estimator_with_a_fixed_generator() -> None:
    model = tiny_model().eval()
    batch = token_batches(n_batches=1, batch=4, length=32)[0]
    batch["doc_ids"][:, 20:] = 1
    res = evaluate(model, [batch], n_bootstrap=10, seed=7, stp_n_spans=5, progress=False)
    with torch.no_grad():
        taps = model(batch["tokens"], doc_ids=batch["doc_ids"]).taps
        ref = stp_per_layer([t.hidden for t in taps], 5, mask=batch["doc_ids"],
                            generator=torch.Generator().manual_seed(7))
    got = torch.tensor([layer["stp"]["mean"] for layer in res["layers"]])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_evaluate_is_deterministic_and_restores_training_mode() -> None:
    model = tiny_model().train()
    a = evaluate(model, token_batches(1, length=24), strides=(1, 2), n_bootstrap=100, seed=3, progress=False)
    assert model.training
    b = evaluate(model, token_batches(1, length=24), strides=(1, 2), n_bootstrap=100, seed=3, progress=False)
    assert json.dumps(a) == json.dumps(b)
    c = evaluate(model, token_batches(1, length=24), strides=(1, 2), n_bootstrap=100, seed=4, progress=False)
    assert c["layers"][1]["stp"]["mean"] != a["layers"][1]["stp"]["mean"]  # the seed drives the spans


def test_evaluate_rejects_bad_input() -> None:
    model = GeometryModel([depth_path(turn=2)])
    with pytest.raises(AnalysisError, match="too short"):
        evaluate(model, token_batches(length=2), progress=False)
    with pytest.raises(AnalysisError, match="stride 4 needs T >= 9"):
        evaluate(model, token_batches(length=8), strides=(1, 4), progress=False)
    with pytest.raises(AnalysisError, match="no batches"):
        evaluate(model, [], progress=False)
    with pytest.raises(AnalysisError, match="strides"):
        evaluate(model, token_batches(), strides=(0,), progress=False)


# ------------------------------------------------------------------------------------------------
# compare


def test_compare_with_itself_is_zero_and_does_not_exclude_zero() -> None:
    res = evaluate(GeometryModel([depth_path(turn=1), depth_path(turn=3)]), token_batches(n_batches=3),
                   n_bootstrap=200, progress=False)
    comp = compare(res, res)
    assert comp["paired"] and "paired" in comp["method"]
    diffs = [b["depth"] for b in comp["boundaries"]] + [t["depth"] for t in comp["boundary_types"].values()]
    diffs += [layer["stp"] for layer in comp["layers"]] + [layer["token"]["1"] for layer in comp["layers"]]
    diffs += [f["depth_in"] for f in comp["families"].values()]
    for d in diffs:
        assert d["diff"] == 0.0 and d["ci"] == [0.0, 0.0] and d["excludes_zero"] is False
        assert d["a"] == d["b"]


def test_compare_flags_a_real_difference_at_the_right_boundaries() -> None:
    batches = token_batches(n_batches=3)
    a = evaluate(GeometryModel([depth_path(turn=1)]), batches, n_bootstrap=200, progress=False)
    b = evaluate(GeometryModel([depth_path(turn=1), depth_path(turn=3)]), batches, n_bootstrap=200, progress=False)
    comp = compare(a, b)
    assert comp["paired"] and comp["difference"] == "a - b"
    d = {x["name"]: x["depth"] for x in comp["boundaries"]}
    assert d["A0->E0"]["diff"] == pytest.approx(0.5, abs=1e-5) and d["A0->E0"]["excludes_zero"]
    assert d["M0->R0"]["diff"] == pytest.approx(-0.5, abs=1e-5) and d["M0->R0"]["excludes_zero"]
    assert not d["E0->M0"]["excludes_zero"]


def test_compare_on_different_data_is_unpaired() -> None:
    model = GeometryModel([depth_path(turn=1)])
    a = evaluate(model, token_batches(seed=0), n_bootstrap=50, progress=False)
    b = evaluate(model, token_batches(seed=1), n_bootstrap=50, progress=False)
    comp = compare(a, b)
    assert not comp["paired"] and "independent" in comp["method"]


def test_compare_rejects_another_pattern() -> None:
    a = evaluate(GeometryModel([depth_path(turn=1)]), token_batches(), n_bootstrap=20, progress=False)
    b = evaluate(GeometryModel([depth_path(turn=1)], pattern="AAMR"), token_batches(), n_bootstrap=20,
                 progress=False)
    with pytest.raises(AnalysisError, match="different patterns: 'AEMR' vs 'AAMR'"):
        compare(a, b)
    c = evaluate(GeometryModel([depth_path(turn=1)]), token_batches(), strides=(1, 2), n_bootstrap=20,
                 progress=False)
    with pytest.raises(AnalysisError, match="different strides"):
        compare(a, c)


# ------------------------------------------------------------------------------------------------
# report files


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.01  # something was drawn


def assert_tables_well_formed(md: str) -> None:
    """Every row of every Markdown table has as many cells as its header (a bare | in a cell would split it)."""
    cells = None
    for line in md.splitlines():
        if not line.startswith("|"):
            cells = None
            continue
        n = len(re.findall(r"(?<!\\)\|", line))
        if cells is None:
            cells = n
        assert n == cells, line


def test_the_table_check_catches_a_split_cell() -> None:
    assert_tables_well_formed("| a | b |\n|---|---|\n| x \\| y | z |")  # an escaped pipe stays in its cell
    with pytest.raises(AssertionError):
        assert_tables_well_formed("| a | b |\n|---|---|\n| x | y | z |")


def test_write_report_json_markdown_png(tmp_path: Path) -> None:
    batches = token_batches()
    a = evaluate(GeometryModel([depth_path(turn=2)]), batches, n_bootstrap=50, progress=False)
    b = evaluate(GeometryModel([depth_path(turn=3)]), batches, n_bootstrap=50, progress=False)
    a["label"], b["label"] = "run-a", "run-b"
    report = {"config": {"data": "synthetic", "stp_selected": ["M0"]}, "result": a, "result_b": b,
              "comparison": compare(a, b)}
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["result"]["boundaries"][2]["depth"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert data["comparison"]["boundaries"][2]["depth"]["diff"] == pytest.approx(1.0, abs=1e-5)
    md = paths["md"].read_text()
    for heading in ("## Depth curvature per boundary type", "## Per family", "## Per layer", "## Comparison"):
        assert heading in md
    assert re.search(r"\| E->M \| 1 \| 1\.0000 ± 0\.000 \[1\.0000, 1\.0000\] \|", md)
    assert_tables_well_formed(md)
    assert "| 3 | M0 * | mamba |" in md
    assert_valid_png(paths["png"])
    # without a comparison: one panel, no comparison section
    single = {"config": {"data": "synthetic"}, "result": a}
    assert "## Comparison" not in format_markdown(single)
    assert_valid_png(write_report(single, tmp_path / "single")["png"])


@pytest.fixture
def toy_family():
    """A fifth family 'W', registered for one test: the report must pick it up from the registry."""
    from dataclasses import dataclass

    from amer.families import FamilySpec, register_family, unregister_family

    @dataclass(frozen=True)
    class ToyConfig:
        pass

    class ToyMixer(nn.Module):
        pass

    spec = register_family(FamilySpec(letter="W", name="toy", colour="#ff7f0e", config_key="toy", config=ToyConfig,
                                      mixer=ToyMixer))
    yield spec
    unregister_family("W")  # idempotent: the test may already have removed it


def test_a_registered_family_appears_in_the_report(toy_family, tmp_path: Path) -> None:
    batches = token_batches()
    a = evaluate(GeometryModel([depth_path(turn=2)], pattern="AWMR"), batches, n_bootstrap=20, progress=False)
    b = evaluate(GeometryModel([depth_path(turn=3)], pattern="AWMR"), batches, n_bootstrap=20, progress=False)
    assert list(a["families"]) == ["A", "M", "R", "W"]  # registry order
    assert a["families"]["W"]["name"] == "toy" and a["families"]["W"]["blocks"] == ["W0"]
    assert a["families"]["W"]["depth_out"]["mean"] == pytest.approx(1.0, abs=1e-5)  # W0->M0 turns
    assert [x["type"] for x in a["boundaries"]] == ["embed->A", "A->W", "W->M", "M->R", "R->final"]
    report = {"config": {"data": "synthetic"}, "result": a, "result_b": b, "comparison": compare(a, b)}
    paths = write_report(report, tmp_path / "out")
    md = paths["md"].read_text()
    assert "| W (toy) | 1 |" in md and "| 2 | W0 | toy |" in md
    assert_valid_png(paths["png"])
    # a report read back where the family is not registered still renders
    from amer.families import unregister_family

    unregister_family("W")
    assert "| W (toy) | 1 |" in write_report(report, tmp_path / "later")["md"].read_text()
    assert_valid_png(tmp_path / "later" / "curvature.png")


# ------------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~13 kB of text in one document: its held-out tail gives a few rows of 64 tokens."""
    rng = np.random.default_rng(0)
    words = "the of and to in that is was he for it with as his on be at by had not".split()
    lines = [" ".join(rng.choice(words, size=10)) for _ in range(400)]
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("\n".join(lines))
    return path


def make_checkpoint(root: Path, name: str, pattern: str, data: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", pattern=pattern)
    meta = {"config": {"model": to_dict(cfg), "data": str(data), "seq_len": 64, "seed": 0, "val_fraction": 0.05,
                       "stp": {"enabled": True, "layers": "A-1", "n_spans": 4}}, "step": 1}
    return save_checkpoint(root / name / "step_000001", HybridLM(cfg), None, meta)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli_main(["curvature", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_fresh_pattern_end_to_end(tmp_path: Path, small_text: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--pattern", "tiny", "--batches", "2", "--seq-len", "64", "--data", str(small_text), "--no-progress",
            "--n-bootstrap", "200"]
    rc, out, err = run_cli(args + ["--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    assert "boundary type" in out and "E->M" in out and "M (mamba)" in out
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"curvature.json", "curvature.md", "curvature.png"}
    report = json.loads((tmp_path / "a" / "curvature.json").read_text())
    cfg = report["config"]
    assert (cfg["data"], cfg["seq_len"], cfg["seed"], cfg["split"]) == (str(small_text), 64, 0, "validation")
    assert report["result"]["n_sequences"] == cfg["n_sequences"] >= 2
    assert [b["type"] for b in report["result"]["boundaries"]] == [t for _, t in BOUNDARIES]
    assert_valid_png(tmp_path / "a" / "curvature.png")
    # determinism: the same seed gives the same numbers
    rc, _, _ = run_cli(args + ["--out", str(tmp_path / "b")], capsys)
    assert rc == 0
    again = json.loads((tmp_path / "b" / "curvature.json").read_text())
    assert again["result"] == report["result"]


def test_cli_checkpoint_compare_default_out(tmp_path: Path, small_text: Path, capsys: pytest.CaptureFixture) -> None:
    a = make_checkpoint(tmp_path, "run_a", PATTERN, small_text, seed=0)
    b = make_checkpoint(tmp_path, "run_b", PATTERN, small_text, seed=1)
    rc, out, err = run_cli(["--checkpoint", str(a.parent), "--compare", str(b), "--batches", "1",
                            "--batch-size", "4", "--n-bootstrap", "100", "--no-progress"], capsys)
    assert rc == 0, err
    assert "A − B (paired bootstrap" in out
    out_dir = a.parent / "curvature"  # default: <run>/curvature
    report = json.loads((out_dir / "curvature.json").read_text())
    assert report["config"]["data"] == str(small_text) and report["config"]["seq_len"] == 64  # from the checkpoint
    assert report["config"]["stp_selected"] == ["A0"]
    assert report["comparison"]["paired"] and report["result_b"]["label"] == str(b)
    assert "## Comparison" in (out_dir / "curvature.md").read_text()
    assert_valid_png(out_dir / "curvature.png")


def test_cli_units_and_checks(tmp_path: Path, small_text: Path, capsys: pytest.CaptureFixture) -> None:
    """--units picks what the Markdown and the terminal show (the JSON holds both); the --no-* flags leave their
    sections out of every file."""
    args = ["--pattern", "tiny", "--batches", "1", "--batch-size", "4", "--seq-len", "48", "--data", str(small_text),
            "--no-progress", "--n-bootstrap", "50"]
    rc, out, err = run_cli(args + ["--units", "one-minus-cos", "--out", str(tmp_path / "omc")], capsys)
    assert rc == 0, err
    md = (tmp_path / "omc" / "curvature.md").read_text()
    assert "°" not in md.split("## Per layer")[1] and "depth curvature (1 - cos)" in md
    assert "°" not in out.split("checks at stride")[0]
    report = json.loads((tmp_path / "omc" / "curvature.json").read_text())
    assert report["config"]["units"] == "one-minus-cos"
    assert report["result"]["layers"][1]["token_deg"]["1"]["mean"] is not None  # both units in the JSON
    for section in ("## Normal and tangential parts", "## Baselines", "## Curvature against next-token entropy",
                    "## Anisotropy"):
        assert section in md
    rc, out, err = run_cli(args + ["--units", "angle", "--no-baselines", "--no-anisotropy", "--no-entropy",
                                   "--out", str(tmp_path / "lean")], capsys)
    assert rc == 0, err
    md = (tmp_path / "lean" / "curvature.md").read_text()
    assert "depth curvature (angle (°))" in md and "(1 - cos)" not in md.split("## Per layer")[1]
    for section in ("## Baselines", "## Curvature against next-token entropy", "## Anisotropy"):
        assert section not in md
    lean = json.loads((tmp_path / "lean" / "curvature.json").read_text())
    assert lean["result"]["options"] == {"baselines": False, "anisotropy": False, "entropy": False,
                                         "entropy_window": 8}
    assert "baselines" not in lean["result"]["layers"][0]
    assert_valid_png(tmp_path / "lean" / "curvature.png")


@pytest.mark.parametrize("case, needle", [
    ("neither", "give --checkpoint PATH"),
    ("missing-checkpoint", "checkpoint not found"),
    ("other-pattern", "has pattern 'AAMR' but the first model has 'AEMR'"),
    ("seq-len", "--seq-len must be an integer >= 3"),
    ("too-small", "need at least 2 rows"),
    ("missing-data", "does not exist"),
    ("bad-strides", "--strides must be comma-separated integers"),
    ("stride-too-long", "too short for stride 40"),
    ("unknown-flag", "unrecognized arguments: --bogus"),
    ("units", "--units: invalid choice: 'radians'"),
    ("entropy-window", "--entropy-window"),
])
def test_cli_bad_input_is_one_line_and_exit_2(case: str, needle: str, tmp_path: Path, small_text: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    tiny = ["--pattern", "tiny", "--data", str(small_text), "--no-progress", "--out", str(tmp_path / "o")]
    if case == "neither":
        args = ["--data", str(small_text)]
    elif case == "missing-checkpoint":
        args = ["--checkpoint", str(tmp_path / "nope")]
    elif case == "other-pattern":
        args = tiny + ["--compare", str(make_checkpoint(tmp_path, "other", "AAMR", small_text))]
    elif case == "seq-len":
        args = tiny + ["--seq-len", "2"]
    elif case == "too-small":
        (tmp_path / "tiny.txt").write_text("just a few words\n")
        args = ["--pattern", "tiny", "--data", str(tmp_path / "tiny.txt"), "--seq-len", "64"]
    elif case == "missing-data":
        args = ["--pattern", "tiny", "--data", str(tmp_path / "missing.txt")]
    elif case == "bad-strides":
        args = tiny + ["--strides", "1,x"]
    elif case == "stride-too-long":
        args = tiny + ["--strides", "1,40", "--seq-len", "64"]
    elif case == "units":
        args = tiny + ["--units", "radians"]
    elif case == "entropy-window":
        args = tiny + ["--entropy-window", "0"]
    else:
        args = tiny + ["--bogus"]
    rc, out, err = run_cli(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written on bad input
