"""What a run directory, a checkpoint and a non-finite loss must never do: crash the process, write outside the
run, delete or rewrite what a user put there, leave a half file, or end with exit code 0 after training nothing.

Runs are the tiny preset for a few steps in-process (well under a second each); the one-line, exit-2 form of
every refusal is checked in ``tests/test_bad_inputs.py``, kills at chosen points in ``tests/test_crash_safety.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import amer.cli.train as train_cli
import amer.objective as objective_mod
import amer.runtime as runtime
from amer.checkpoint import CHECKPOINT_FILES, find_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from amer.config import ModelConfig, TrainConfig
from amer.errors import CheckpointError
from amer.fileio import atomic_write_text, recover_dirs, temp_sibling, write_json
from amer.model import HybridLM
from amer.optimstate import checked_state_dict
from amer.training import make_optimizer
from amer.training.run import MARKER, prune


def run(out: Path, name: str, *extra: str, expect: int = 0) -> Path:
    argv = ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", *extra]
    assert train_cli.main(argv) == expect, argv
    return out / name


def resume(path: Path, *extra: str, expect: int = 0) -> None:
    assert train_cli.main(["--resume", str(path), "--no-progress", *extra]) == expect


def one_error(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must come out of a refused resume untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(text: str | bytes) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON file amer wrote")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- optimizer state is checked before it is loaded


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished runs whose optimizer groups have the same sizes but different shapes (AEMR and RMEA)."""
    out = tmp_path_factory.mktemp("two")
    return (run(out, "a", "--steps", "2", "--eval-interval", "2"),
            run(out, "b", "--steps", "2", "--eval-interval", "2", "--pattern", "RMEA"))


def test_optimizer_state_of_another_pattern_is_refused(tmp_path: Path, two_runs: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture) -> None:
    a = tmp_path / "a"
    shutil.copytree(two_runs[0], a)
    shutil.copy(two_runs[1] / "step_000002" / "optim.safetensors", a / "step_000002" / "optim.safetensors")
    before = snapshot(a)
    resume(a, "--steps", "4", expect=2)  # before: a fused-AdamW read past the moments' buffers (exit 139)
    line = one_error(capsys)
    assert "step_000002/optim.safetensors: tensor '" in line and "but parameter" in line and "shape" in line
    assert snapshot(a) == before


def _tiny_optimizer() -> tuple[HybridLM, torch.optim.Optimizer, dict[str, torch.Tensor], dict]:
    """A model, its optimizer after one step, and that step's state as save_checkpoint stores it."""
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="AE", d_model=16, moe={"n_experts": 2, "top_k": 1}))
    opt = make_optimizer(model, TrainConfig(preset="tiny", model=model.cfg, seq_len=8))
    model(torch.randint(0, 256, (1, 8))).logits.sum().backward()
    opt.step()
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone()
               for pid, st in sd["state"].items() for k, v in st.items()}
    meta = json.loads(json.dumps({"optimizer": {"param_groups": sd["param_groups"]}, "_path": "ck"}))
    return model, opt, tensors, meta


def _set(t: dict, key: str, value: torch.Tensor) -> None:
    t[key] = value


@pytest.mark.parametrize("damage, fragment", [
    (lambda t, m, p: _set(t, f"{p}.exp_avg", t[f"{p}.exp_avg"].flatten()[:5].clone()),
     "'{p}.exp_avg' is float32 of shape (5,), but parameter {p}"),
    (lambda t, m, p: _set(t, f"{p}.exp_avg", t[f"{p}.exp_avg"].double()), "'{p}.exp_avg' is float64"),
    (lambda t, m, p: _set(t, f"{p}.exp_avg_sq", -t[f"{p}.exp_avg_sq"] - 1), "'{p}.exp_avg_sq'"),
    (lambda t, m, p: _set(t, f"{p}.exp_avg", t[f"{p}.exp_avg"] * float("nan")), "non-finite values"),
    (lambda t, m, p: _set(t, f"{p}.step", torch.tensor(-2.0)), "is step -2.0"),
    (lambda t, m, p: _set(t, f"{p}.step", torch.tensor([1.0, 2.0])), "one float32 step count"),
    (lambda t, m, p: _set(t, "999.exp_avg", t[f"{p}.exp_avg"]), "is for parameter 999"),
    (lambda t, m, p: _set(t, f"{p}.momentum", t[f"{p}.exp_avg"]), "unexpected tensor '{p}.momentum'"),
    (lambda t, m, p: t.pop(f"{p}.exp_avg_sq"), "lacks ['exp_avg_sq']"),
    (lambda t, m, p: m["optimizer"]["param_groups"][0].update(maximize=True), "maximize is True"),
    (lambda t, m, p: m["optimizer"]["param_groups"][0].update(lr=float("inf")), "lr must be a finite number"),
    (lambda t, m, p: m["optimizer"]["param_groups"][0].update(betas=[0.9, 1.5]), "betas must be two numbers"),
    (lambda t, m, p: m["optimizer"]["param_groups"][0].update(params=[0, 1]), "holds parameters [0, 1]"),
    (lambda t, m, p: m["optimizer"]["param_groups"].pop(), "1 optimizer parameter groups"),
    (lambda t, m, p: m["optimizer"]["param_groups"][1].pop("lr"), "lacks ['lr']"),
    (lambda t, m, p: m["optimizer"]["param_groups"][1].update(nesterov=True), "unknown keys ['nesterov']"),
    (lambda t, m, p: m.pop("optimizer"), "has no optimizer.param_groups"),
])
def test_every_optimizer_tensor_and_group_is_checked(damage, fragment: str) -> None:
    model, opt, tensors, meta = _tiny_optimizer()
    checked_state_dict(opt, tensors, meta, "ck", model)  # the undamaged state passes
    pid = min(int(k.split(".")[0]) for k in tensors)
    damage(tensors, meta, pid)
    with pytest.raises(CheckpointError) as e:
        checked_state_dict(opt, tensors, meta, "ck", model)
    assert fragment.format(p=pid) in str(e.value)
    assert "ck/" in str(e.value)  # names the file


# ---------------------------------------------------------------- resume writes only where amer created the run


def test_resume_refuses_a_checkpoint_outside_a_run_directory(tmp_path: Path, two_runs: tuple[Path, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    """A checkpoint copied into a folder of the user's: the folder is not a run, nothing in it may change."""
    folder = tmp_path / "mine"
    shutil.copytree(two_runs[0] / "step_000002", folder / "step_000002")
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "log.jsonl").write_text("my own notes, not JSON\n")
    (folder / "step_000001").mkdir()
    (folder / "step_000001" / "data.csv").write_text("1,2\n")
    (folder / ".tmp-precious").mkdir()
    before = snapshot(folder)
    resume(folder / "step_000002", "--steps", "4", expect=2)
    assert MARKER in one_error(capsys)
    assert snapshot(folder) == before


def test_resume_keeps_what_a_user_added_to_the_run(tmp_path: Path) -> None:
    r = run(tmp_path, "r", "--steps", "4", "--eval-interval", "1", "--keep-last", "1", "--stop-at", "2")
    with (r / "log.jsonl").open("a") as f:
        f.write("# a note of mine\n")
    (r / "notes.txt").write_text("keep me")
    (r / "step_000002" / "analysis.ipynb").write_text("{}")
    (r / ".tmp-mine").mkdir()
    resume(r)
    assert (r / "notes.txt").read_text() == "keep me" and (r / ".tmp-mine").is_dir()
    assert "# a note of mine\n" in (r / "log.jsonl").read_text()
    # step_000002 was pruned (keep-last 1): its three files went, the user's notebook and the folder stayed
    assert sorted(p.name for p in (r / "step_000002").iterdir()) == ["analysis.ipynb"]
    assert [p.name for p in list_checkpoints(r)] == ["step_000004"]


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path, two_runs: tuple[Path, Path],
                                                capsys: pytest.CaptureFixture) -> None:
    a = tmp_path / "a"
    shutil.copytree(two_runs[0], a)
    other = run(tmp_path, "other", "--steps", "2", "--eval-interval", "2")
    shutil.copytree(other / "step_000002", a / "step_000003")
    resume(a / "step_000003", "--steps", "4", expect=2)
    assert "belongs to another run" in one_error(capsys)
    shutil.move(a / "step_000003", a / "step_000001")  # older than a's own: pruning must leave it alone
    resume(a, "--steps", "4", "--keep-last", "1", "--eval-interval", "1")
    assert [p.name for p in list_checkpoints(a)] == ["step_000001", "step_000004"]
    assert read_checkpoint(a / "step_000001")[2]["run_id"] != read_checkpoint(a)[2]["run_id"]


# ---------------------------------------------------------------- a run without a checkpoint, and --overwrite


def _died_before_first_checkpoint(out: Path) -> Path:
    r = run(out, "r", "--steps", "3", "--eval-interval", "3")
    for ck in [*list_checkpoints(r), r / "best"]:
        shutil.rmtree(ck)
    return r


def test_run_without_checkpoint_resumes_from_step_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = _died_before_first_checkpoint(tmp_path)
    capsys.readouterr()
    run(tmp_path, "r", "--steps", "3", "--eval-interval", "3", expect=2)
    line = one_error(capsys)
    assert f"--resume {r}" in line and "step 0" in line and "--overwrite" in line
    resume(r)
    assert "starting it again from step 0" in capsys.readouterr().out
    steps = [rec["step"] for rec in map(json.loads, (r / "log.jsonl").read_text().splitlines()) if "ce" in rec]
    assert steps == [3], "the lines of the lost attempt are dropped, each step is logged once"
    assert [p.name for p in list_checkpoints(r)] == ["step_000003"]
    ref = run(tmp_path, "ref", "--steps", "3", "--eval-interval", "3")
    w, ref_w = read_checkpoint(r)[0], read_checkpoint(ref)[0]
    assert all(torch.equal(w[k], ref_w[k]) for k in w)


def test_overwrite_starts_afresh_and_keeps_foreign_files(tmp_path: Path) -> None:
    r = run(tmp_path, "r", "--steps", "2", "--eval-interval", "1")
    (r / "notes.txt").write_text("mine")
    old_id = json.loads((r / MARKER).read_text())["run_id"]
    run(tmp_path, "r", "--steps", "1", "--eval-interval", "1", "--overwrite")
    assert (r / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(r)] == ["step_000001"]
    assert [json.loads(x)["step"] for x in (r / "log.jsonl").read_text().splitlines()] == [1, 1]
    assert json.loads((r / MARKER).read_text())["run_id"] != old_id


def test_resume_with_steps_below_the_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = run(tmp_path, "r", "--steps", "4", "--eval-interval", "2")
    before = snapshot(r)
    capsys.readouterr()
    resume(r, "--steps", "3", expect=2)
    assert "--steps 3 is below the step of the checkpoint being resumed (4)" in one_error(capsys)
    assert snapshot(r) == before


# ---------------------------------------------------------------- non-finite losses


def test_a_run_that_skips_most_steps_fails_and_writes_no_nan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = run(tmp_path, "r", "--steps", "10", "--max-bad-steps", "100", "--lr", "1e3", "--eval-interval", "5",
            expect=1)
    line = one_error(capsys)
    assert "of 10 steps were skipped" in line
    for p in r.rglob("*.json*"):
        for text in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
            strict_json(text)
    for ck in list_checkpoints(r):
        meta = strict_json((ck / "meta.json").read_text())
        assert meta["best_val"] is None or meta["best_val"] < 1e30


def test_non_finite_validation_is_a_bad_step_and_never_checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import amer.training.loop as loop_mod

    real = loop_mod.evaluate

    def nan_after_two(model, batches, **kw):
        res = real(model, batches, **kw)
        if nan_after_two.calls >= 1:
            res["loss"] = res["bpb"] = float("nan")
        nan_after_two.calls += 1
        return res

    nan_after_two.calls = 0
    monkeypatch.setattr(loop_mod, "evaluate", nan_after_two)
    r = run(tmp_path, "r", "--steps", "4", "--eval-interval", "2", expect=1)
    assert "final validation loss is non-finite" in one_error(capsys)
    assert [p.name for p in list_checkpoints(r)] == ["step_000002"]
    lines = [strict_json(x) for x in (r / "log.jsonl").read_text().splitlines()]
    assert {"step": 4, "val/loss": None, "val/bpb": None, "val/stp": lines[-1]["val/stp"],
            "val/skipped": "non-finite validation loss"} == lines[-1]


def test_an_overflowing_stp_term_names_stp_weight_not_lr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(tmp_path, "r", "--steps", "3", "--stp.weight", "1e300", "--stp.start-step", "0", "--stp.ramp-steps", "0",
        "--max-bad-steps", "2", expect=1)
    line = one_error(capsys)
    assert "--stp.weight" in line and "--lr" not in line


def test_a_non_finite_cross_entropy_names_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    real = objective_mod.cross_entropy
    monkeypatch.setattr(objective_mod, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    run(tmp_path, "r", "--steps", "3", "--max-bad-steps", "2", expect=1)
    assert "cross-entropy is non-finite; lower --lr" in one_error(capsys)


# ---------------------------------------------------------------- checkpoints by step number


def test_checkpoints_sort_by_step_number_not_name(tmp_path: Path) -> None:
    model = HybridLM(ModelConfig(pattern="A", d_model=8))
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_checkpoint(tmp_path / f"step_{step:06d}", model, None, {"step": step})
    (tmp_path / "step_latest").mkdir()  # not a step number: ignored
    assert [p.name for p in list_checkpoints(tmp_path)][-2:] == ["step_1000000", "step_1000001"]
    assert find_checkpoint(tmp_path).name == "step_1000001"
    prune(tmp_path, 2)  # keep-last deletes the oldest, not the newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1000000", "step_1000001"]


# ---------------------------------------------------------------- files: complete or absent


def test_writers_leave_the_old_file_when_the_new_one_cannot_be_written(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    with pytest.raises(ValueError, match="non-finite number at 'b.0'"):
        write_json(target, {"b": [float("nan")]})
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert strict_json(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temporary left behind"


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-swap", "two-renames"])
def test_best_swap_survives_a_kill_between_its_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     exchange: bool) -> None:
    import amer.fileio as fileio

    model = HybridLM(ModelConfig(pattern="A", d_model=8))
    save_checkpoint(tmp_path / "best", model, None, {"step": 1})
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)

    def killed(name: str) -> None:
        if name == "swap:best":
            raise KeyboardInterrupt  # stands in for the kill: nothing after this point runs

    monkeypatch.setattr(fileio, "fault_point", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "best", model, None, {"step": 2})
    recover_dirs(tmp_path, lambda n: n == "best", CHECKPOINT_FILES)  # what resume does first
    assert [p.name for p in tmp_path.iterdir()] == ["best"], "nothing leaks"
    assert strict_json((tmp_path / "best" / "meta.json").read_text())["step"] in (1, 2)


def test_a_temporary_with_user_files_is_emptied_not_deleted(tmp_path: Path) -> None:
    leftover = temp_sibling(tmp_path / "best")
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    (leftover / "mine.txt").write_text("x")
    recover_dirs(tmp_path, lambda n: n == "best", CHECKPOINT_FILES)
    assert [p.name for p in leftover.iterdir()] == ["mine.txt"]


def test_nothing_writes_files_except_through_the_atomic_writers() -> None:
    """Every file amer writes goes through amer.fileio (or into a checkpoint's temporary directory, or the
    append-only log): a new ``write_text`` or ``open(..., "w")`` elsewhere would be a file that can be torn."""
    import re

    pkg = Path(__file__).resolve().parents[1] / "amer"
    direct = re.compile(r"\.write_(text|bytes)\(|open\([^)]*[\"'][wax]b?[\"']|json\.dump\(|\.savefig\([^b]")
    allowed = {"fileio.py", "checkpoint.py"}  # checkpoint.py writes inside its temporary directory only
    hits = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if p.name not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert hits == []
    assert direct.search('tmp.write_text("x")') and direct.search('open(p, "w")')  # the rule catches both forms


# ---------------------------------------------------------------- bfloat16 on a CPU without bfloat16 instructions


def test_bfloat16_without_native_support_warns_once_with_the_measured_slowdown(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "_BF16_CHECKED", False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(runtime, "_bf16_slowdown", lambda: 13.0)
    cpu = torch.device("cpu")
    assert runtime.warn_slow_bfloat16("bfloat16", cpu) == 13.0
    assert runtime.warn_slow_bfloat16("bfloat16", cpu) is None  # once per process
    err = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(err) == 1 and "13.0x slower than float32" in err[0] and "AVX512-BF16" in err[0]


@pytest.mark.parametrize("flags, dtype", [({"avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                                          ({"bf16"}, "bfloat16"), (set(), "float32")])
def test_no_bfloat16_warning_where_it_is_native_or_unused(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture, flags, dtype) -> None:
    monkeypatch.setattr(runtime, "_BF16_CHECKED", False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(runtime, "_bf16_slowdown", lambda: 13.0)
    assert runtime.warn_slow_bfloat16(dtype, torch.device("cpu")) is None
    assert caplog.records == []


def test_the_slowdown_is_measured_here() -> None:
    assert 0 < runtime._bf16_slowdown(size=64, repeats=2) < 1000
    assert runtime.bfloat16_native() in (True, False, None)


def test_an_experiment_arm_with_a_non_finite_figure_is_kept_as_strict_json(tmp_path: Path) -> None:
    from amer.experiments.nlrx.runner import FIGURES
    from amer.experiments.runs import GridSettings, read_record, write_record

    class Settings(GridSettings):
        def fingerprint(self) -> dict:
            return {}

    rec = {"id": "a", "accuracy": 0.5, "heldout_ce": float("nan"), "erank": float("inf"), "train_stp": None}
    write_record(tmp_path / "arm.json", rec, FIGURES)
    strict_json((tmp_path / "arm.json").read_text())
    back = read_record(tmp_path / "arm.json", Settings(out=str(tmp_path)), FIGURES)
    assert back["accuracy"] == 0.5 and back["train_stp"] is None
    assert back["heldout_ce"] != back["heldout_ce"] and back["erank"] != back["erank"]  # NaN again


def test_an_allocation_that_cannot_fit_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """Sizes a user chose (a batch of 10^8 rows, a width of 10^6) end in one line, not an allocator traceback."""
    from amer.cli.base import run as run_command

    def huge(argv: list[str]) -> int:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000 bytes. Error code 12 (Cannot allocate memory)")

    assert run_command(huge, []) == 2
    assert "out of memory: an allocation of 25.6 GB failed; lower --batch-size" in one_error(capsys)
    with pytest.raises(RuntimeError, match="something else"):  # other runtime errors are not dressed up
        run_command(lambda argv: (_ for _ in ()).throw(RuntimeError("something else")), [])
