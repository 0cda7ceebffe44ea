"""Training curves as a picture (amer/report/curves.py, amer/report/runlog.py, ``amer plot``) and the curvature
figure's conventions (amer/report/curvature.py, amer/report/style.py).

One real tiny run, stopped part-way and resumed, is shared by the module; the other runs ``amer plot`` overlays
are copies of its log with a changed config, so no test pays for a second training run it does not need.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import amer.report.curves as curves
from amer.cli import main as cli_main
from amer.cli import train as train_cli
from amer.report.curves import curves_figure, draw_run_curves, is_amer_curves
from amer.report.runlog import parse_log, read_run
from amer.report.style import IID_NOISE, RANDOM_WALK

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS, STOP_AT = 12, 7
TINY = ["--preset", "tiny", "--no-progress", "--no-tensorboard", "--batch-size", "2", "--seq-len", "32",
        "--eval-batches", "2", "--log-interval", "2", "--eval-interval", "5", "--steps", str(STEPS)]


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    assert float(img[..., :3].std()) > 0.01  # something was drawn


def legend_texts(fig) -> list[str]:
    from matplotlib.legend import Legend

    return [t.get_text() for leg in fig.findobj(Legend) for t in leg.get_texts()]


def reference_levels(ax) -> list[float]:
    return sorted(float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_gid() == "reference")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The tiny preset (STP gated on at step 10), stopped at step 7 and resumed to 12; every call of the
    loop's curves hook is recorded with the log's last step and the picture's hash right after it."""
    out = tmp_path_factory.mktemp("plot")
    calls: list[dict] = []

    def spy(rd):
        path = draw_run_curves(rd)
        png = Path(rd) / "curves.png"
        last = max(json.loads(line)["step"] for line in (Path(rd) / "log.jsonl").read_text().splitlines())
        calls.append({"returned": path, "last_step": last,
                      "sha": hashlib.sha256(png.read_bytes()).hexdigest() if png.exists() else None})
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("amer.training.loop.draw_run_curves", spy)
        assert train_cli.main([*TINY, "--out-dir", str(out), "--run-name", "on", "--stop-at", str(STOP_AT)]) == 0
        assert train_cli.main(["--resume", str(out / "on"), "--no-progress"]) == 0
    return out / "on", calls


# ------------------------------------------------------------------------------------------------ the run's picture


def test_run_writes_curves_png_at_every_evaluation_and_the_end(run_dir) -> None:
    rd, calls = run_dir
    # evaluations at 5 and 7 (the stop), then 10 and 12 after the resume; each segment ends with one more call
    assert [c["last_step"] for c in calls] == [5, 7, 7, 10, 12, 12]
    assert all(c["sha"] is not None for c in calls)
    assert len({c["sha"] for c in calls}) == 4, "a new picture at every evaluation, the same one at each end"
    assert calls[2]["sha"] == calls[1]["sha"] and calls[5]["sha"] == calls[4]["sha"]
    png = rd / "curves.png"
    assert_valid_png(png)
    assert is_amer_curves(png)
    assert png.stat().st_mtime_ns >= (rd / "log.jsonl").stat().st_mtime_ns  # drawn after the last log line


def test_curves_show_the_whole_resumed_run_and_the_gate(run_dir) -> None:
    rd, _ = run_dir
    log = read_run(rd)
    assert log.series("ce")[0].tolist() == [2, 4, 6, 7, 8, 10, 12]  # each once (7: the stop) across the resume
    assert log.series("val/loss")[0].tolist() == [5, 7, 10, 12]
    assert log.stp_start == 10
    fig = curves_figure([log])
    ax_loss, ax_stp, ax_tps, ax_tok, ax_depth, _ = fig.axes[:6]
    assert max(max(line.get_xdata()) for line in ax_loss.get_lines()) == STEPS
    gates = [line for line in ax_stp.get_lines() if line.get_gid() == "stp-gate"]
    assert [line.get_xdata()[0] for line in gates] == [10]
    assert reference_levels(ax_stp) == [RANDOM_WALK, IID_NOISE]
    assert reference_levels(ax_tok) == [RANDOM_WALK, IID_NOISE]
    assert reference_levels(ax_depth) == [RANDOM_WALK]  # 1.5 is not a null level along depth
    assert reference_levels(ax_loss) == reference_levels(ax_tps) == []
    # every family of the run's pattern drawn in its registry colour
    from amer.config import ModelConfig

    colours = {line.get_color() for line in ax_tok.get_lines()}
    drawn = {layer.family.spec.colour for layer in ModelConfig.from_preset("tiny").parsed.layers}
    assert len(drawn) > 1 and drawn <= colours


def test_redraw_only_when_the_log_changed(tmp_path: Path, run_dir) -> None:
    rd = tmp_path / "copy"
    rd.mkdir()
    for name in ("log.jsonl", "config.json"):
        shutil.copy(run_dir[0] / name, rd / name)
    png = draw_run_curves(rd)
    first = png.read_bytes()
    assert draw_run_curves(rd) == png and png.read_bytes() == first  # unchanged log: no new drawing
    with open(rd / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 14, "ce": 3.0, "tokens_per_s": 100.0}) + "\n")
    draw_run_curves(rd)
    assert png.read_bytes() != first
    assert max(curves_figure([read_run(rd)]).axes[0].get_lines()[0].get_xdata()) == 14


def test_drawing_failure_warns_and_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(run_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(curves, "write_run_curves", broken)
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "ce": 1.0}) + "\n")
    with pytest.raises(OSError):  # under pytest the error is raised: a test never passes over it
        draw_run_curves(tmp_path)
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert draw_run_curves(tmp_path) is None  # a warning on amer's logger
    assert caplog.messages == ["warning: curves.png not drawn (OSError: No space left on device); training goes on"]
    # a whole run with a broken drawer finishes and says why it has no picture
    assert train_cli.main([*TINY, "--steps", "2", "--eval-interval", "2", "--out-dir", str(tmp_path),
                           "--run-name", "r"]) == 0
    assert not (tmp_path / "r" / "curves.png").exists()
    assert "warning: curves.png not drawn (OSError: No space left on device)" in capsys.readouterr().err


def test_drawing_a_long_log_is_cheap(tmp_path: Path, run_dir) -> None:
    """A 1,000-step log (every figure logged each step) draws well under a second of CPU (about 0.45 s
    measured on 2 shared cores); the bound leaves room for a loaded machine."""
    train = [r for r in map(json.loads, (run_dir[0] / "log.jsonl").read_text().splitlines()) if "ce" in r][-1]
    rng = np.random.default_rng(0)
    lines = []
    for s in range(1, 1001):
        lines.append(json.dumps({**{k: v * (1 + 0.1 * rng.random()) if isinstance(v, float) else v
                                    for k, v in train.items()}, "step": s}))
        if s % 50 == 0:
            lines.append(json.dumps({"step": s, "val/loss": 4.0, "val/stp": 1.3}))
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(run_dir[0] / "config.json", tmp_path / "config.json")
    best = math.inf
    for _ in range(2):
        t = time.process_time()
        curves.write_run_curves(tmp_path)
        best = min(best, time.process_time() - t)
    assert best < 2.0, f"drawing a 1,000-step log took {best:.2f} s of CPU"


# ------------------------------------------------------------------------------------------------ reading logs


def test_log_reading_rules() -> None:
    """Merge per step (later wins), a restart drops the abandoned future, torn lines and skips are handled."""
    def rec(step: int, **kw: object) -> str:
        return json.dumps({"step": step, **kw})

    lines = [rec(2, ce=5.0), rec(4, ce=4.5), rec(4, **{"val/loss": 4.4}), rec(6, ce=4.2), rec(8, ce=4.1),
             rec(8, **{"val/loss": 4.0}),
             '{"step": 9, "ce": 4.',  # a kill mid-line
             rec(6, ce=4.25),  # resumed from the step-4 checkpoint without truncation: 8 is abandoned
             rec(7, skipped=1, skipped_reason="non-finite loss"), rec(8, ce=None), rec(10, ce=3.9),
             rec(4, **{"val/loss": 4.3}), rec(4, ce=4.6)]  # a second restart at 4 replaces step 4
    log = parse_log(lines, "r")
    steps, ce = log.series("ce")
    assert steps.tolist() == [2, 4] and ce.tolist() == [5.0, 4.6]
    assert log.series("val/loss")[1].tolist() == [4.3]
    assert log.skipped == []  # the skip at 7 belonged to the abandoned future too
    log = parse_log(lines[:-2], "r")
    steps, ce = log.series("ce")
    assert steps.tolist() == [2, 4, 6, 8, 10]
    assert ce[:3].tolist() == [5.0, 4.5, 4.25] and math.isnan(ce[3]) and ce[4] == 3.9  # null: a gap
    assert log.series("val/loss")[0].tolist() == [4]  # the abandoned run's val at 8 is gone
    assert log.skipped == [7]
    assert "skipped_reason" not in log.keys()


# ------------------------------------------------------------------------------------------------ amer plot


@pytest.fixture
def two_runs(tmp_path: Path, run_dir) -> tuple[Path, Path]:
    """The module's run and a copy of it that claims STP was off (its STP figures removed)."""
    off = tmp_path / "runs" / "stp-off"
    off.mkdir(parents=True)
    cfg = json.loads((run_dir[0] / "config.json").read_text())
    cfg["stp"]["enabled"] = False
    (off / "config.json").write_text(json.dumps(cfg))
    recs = [json.loads(line) for line in (run_dir[0] / "log.jsonl").read_text().splitlines()]
    (off / "log.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if not (k.startswith("stp") or k == "val/stp")}) + "\n"
        for r in recs))
    return run_dir[0], off


def test_amer_plot_overlays_runs_with_a_legend_naming_each(tmp_path: Path, two_runs, monkeypatch) -> None:
    on, off = two_runs
    drawn = []
    real = curves.curves_figure
    monkeypatch.setattr("amer.cli.plot.curves_figure", lambda logs, **kw: drawn.append(real(logs, **kw)) or drawn[-1])
    out = tmp_path / "cmp.png"
    assert cli_main(["plot", str(on), str(off), "--out", str(out), "--keys", "grad_norm"]) == 0
    assert_valid_png(out)
    assert is_amer_curves(out)
    fig = drawn[-1]
    texts = legend_texts(fig)
    assert "on" in texts and "stp-off" in texts
    assert "on vs stp-off" in fig._suptitle.get_text()
    ax_loss, ax_stp = fig.axes[0], fig.axes[1]
    train = {line.get_label(): line for line in ax_loss.get_lines()}
    assert train["train (on)"].get_linestyle() != train["train (stp-off)"].get_linestyle()
    assert train["train (on)"].get_color() != train["train (stp-off)"].get_color()
    gates = [line.get_label() for line in ax_stp.get_lines() if line.get_gid() == "stp-gate"]
    assert gates == ["STP gate opens (on, step 10)"]  # the run with STP off has no gate
    assert fig.axes[6].get_title() == "grad_norm" and len(fig.axes[6].get_lines()) == 2
    # --labels name the runs; re-running over amer's own output replaces it
    assert cli_main(["plot", str(on), str(off), "--out", str(out), "--labels", "STP on,STP off"]) == 0
    assert {"STP on", "STP off"} <= set(legend_texts(drawn[-1]))


def test_amer_plot_default_output_is_curves_png_here(tmp_path: Path, two_runs, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plot", str(two_runs[0] / "log.jsonl"), str(two_runs[1])]) == 0
    assert is_amer_curves(tmp_path / "curves.png")


@pytest.mark.parametrize("case", ["missing-run", "no-log", "empty-log", "out-is-dir", "out-not-png", "foreign-out",
                                  "labels-count", "labels-dup", "same-run-twice", "unknown-key"])
def test_amer_plot_bad_input_is_one_line_exit_2(tmp_path: Path, two_runs, capsys, case: str) -> None:
    on, off = two_runs
    fresh, foreign = tmp_path / "fresh.png", tmp_path / "user.png"
    foreign.write_bytes(b"a user's own file")
    for name, log in (("nolog", None), ("empty", '{"step": 3, "ce": 1.\n')):  # empty: only a torn line
        (tmp_path / name).mkdir()
        if log is not None:
            (tmp_path / name / "log.jsonl").write_text(log)
    argv = {"missing-run": [tmp_path / "nope"],
            "no-log": [tmp_path / "nolog"],
            "empty-log": [tmp_path / "empty"],
            "out-is-dir": [on, "--out", tmp_path],
            "out-not-png": [on, "--out", tmp_path / "o.txt"],
            "foreign-out": [on, "--out", foreign],
            "labels-count": [on, off, "--labels", "a"],
            "labels-dup": [on, off, "--labels", "a,a"],
            "same-run-twice": [on, on / "log.jsonl"],
            "unknown-key": [on, "--keys", "no/such/key"]}[case]
    argv = [str(a) for a in argv] + ([] if "--out" in argv else ["--out", str(fresh)])
    assert cli_main(["plot", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert foreign.read_bytes() == b"a user's own file", "a file the user did not ask for was overwritten"
    assert not fresh.exists() and not (tmp_path / "o.txt").exists()


def test_amer_plot_force_replaces_a_foreign_file(tmp_path: Path, two_runs) -> None:
    out = tmp_path / "mine.png"
    out.write_bytes(b"not amer's")
    assert cli_main(["plot", str(two_runs[0]), "--out", str(out)]) == 2
    assert out.read_bytes() == b"not amer's"
    assert cli_main(["plot", str(two_runs[0]), "--out", str(out), "--force"]) == 0
    assert is_amer_curves(out)


# ------------------------------------------------------------------------------------------------ curvature figure


def test_reference_levels_are_the_estimators_null_values() -> None:
    """1.0 and 1.5 are what amer's own estimators give on a random walk and on i.i.d. noise; along depth the
    random walk (independent updates) gives 1.0, but i.i.d. states do not give 1.5 at the first boundary."""
    from amer.analysis.trajectory import depth_curvature, token_curvature
    from amer.stp import compute_stp_loss

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 256, 512, generator=g)
    walk = noise.cumsum(dim=1)
    for stride in (1, 4):
        assert float(token_curvature(noise, stride=stride)) == pytest.approx(IID_NOISE, abs=0.02)
        assert float(token_curvature(walk, stride=stride)) == pytest.approx(RANDOM_WALK, abs=0.03)
    assert float(compute_stp_loss(noise, 64, generator=g)) == pytest.approx(IID_NOISE, abs=0.03)
    assert float(compute_stp_loss(walk, 64, generator=g)) == pytest.approx(RANDOM_WALK, abs=0.05)
    updates = torch.randn(8, 2, 16, 512, generator=g)
    states = [torch.zeros(2, 16, 512)] + list(updates.cumsum(dim=0))
    assert depth_curvature(states).numpy() == pytest.approx(np.full(7, RANDOM_WALK), abs=0.05)
    iid_states = [torch.zeros(2, 16, 512)] + list(torch.randn(8, 2, 16, 512, generator=g))
    first = float(depth_curvature(iid_states)[0])
    assert first == pytest.approx(1 + 1 / math.sqrt(2), abs=0.03) and abs(first - IID_NOISE) > 0.15


@pytest.fixture(scope="module")
def curvature_reports() -> tuple[dict, dict]:
    from amer.analysis.compare import compare
    from amer.analysis.curvature import evaluate
    from amer.config import ModelConfig
    from amer.model import HybridLM

    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 256, (4, 24), generator=g)} for _ in range(2)]
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        res = evaluate(HybridLM(ModelConfig.from_preset("tiny")), batches, n_bootstrap=20, progress=False)
        res["label"] = f"model-{seed}"
        results.append(res)
    single = {"config": {"data": "random"}, "result": results[0]}
    paired = {**single, "result_b": results[1], "comparison": compare(results[0], results[1])}
    return single, paired


@pytest.mark.parametrize("which", ["single", "comparison"])
def test_curvature_figure_has_reference_lines_and_says_95_percent_bootstrap(curvature_reports, which) -> None:
    from matplotlib.text import Text

    from amer.report.curvature import curvature_figure

    fig = curvature_figure(curvature_reports[0 if which == "single" else 1])
    axes = {ax.get_label(): ax for ax in fig.axes if ax.get_lines()}
    assert reference_levels(axes["token:one_minus_cos"]) == [RANDOM_WALK, IID_NOISE]  # token curvature
    assert reference_levels(axes["depth:one_minus_cos"]) == [RANDOM_WALK]  # depth curvature
    assert reference_levels(axes["token:angle"]) == [90.0, 120.0]  # the same levels in degrees
    assert reference_levels(axes["depth:angle"]) == [90.0]
    assert reference_levels(axes["whitened:one_minus_cos"]) == [RANDOM_WALK, IID_NOISE]
    for kind in ("decomposition", "entropy", "cosines"):  # ratios, correlations, cosines: no curvature level
        assert reference_levels(axes[kind]) == []
    if which == "comparison":
        assert reference_levels(axes["diff:one_minus_cos"]) == []  # a difference is read against 0, not a null level
    else:
        assert "diff:one_minus_cos" not in axes
    assert [ax.get_label() for ax in curvature_figure(curvature_reports[0], units="angle").axes[:2]] == [
        "token:angle", "depth:angle"]
    texts = " ".join(t.get_text() for t in fig.findobj(Text))
    assert "95% bootstrap confidence intervals" in texts
    assert "1.0 random walk" in texts and "1.5 i.i.d. noise" in texts
    assert any("95% bootstrap CI" in t for t in legend_texts(fig))
