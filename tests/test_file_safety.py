"""Where files go: never through a symbolic link, with the modes the umask gives, and a file system that refuses a
write (full, read-only, a busy mount point) is one line that leaves the previous files intact.

The one-line form of each refusal is also in the bad-input table (``tests/test_bad_inputs.py``); here each rule
is checked for what it protects (the link's target untouched, the old checkpoint readable, nothing left behind),
with a negative control where the rule is a mechanism: the unguarded primitive does go through the link, and
safetensors alone does write 0600.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import amer.cli as cli
from amer.checkpoint import list_checkpoints, read_checkpoint
from amer.errors import CheckpointError, InputError
from amer.fileio import append_bytes, atomic_write_bytes, recover_dirs, remove_own_files, replace_dir
from amer.weights import check_finite

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--preset", "tiny", "--no-progress", "--no-tensorboard", "--no-curves", "--batch-size", "2",
         "--seq-len", "32", "--eval-batches", "1"]


def train(out: Path, name: str, *extra: str, expect: int = 0) -> Path:
    assert cli.main([*TRAIN, "--out-dir", str(out), "--run-name", name, *extra]) == expect
    return out / name


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, and its export in ``exp`` beside it."""
    out = tmp_path_factory.mktemp("finished")
    run = train(out, "run", "--steps", "4", "--eval-interval", "2")
    assert cli.main(["export", str(run), str(out / "exp")]) == 0
    return run


def copy_run(finished: Path, tmp: Path) -> Path:
    shutil.copytree(finished, tmp / "run")
    return tmp / "run"


# ---------------------------------------------------------------- symbolic links: never written through


def test_the_primitives_never_write_replace_or_delete_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "ck").mkdir(parents=True)
    (outside / "ck" / "model.safetensors").write_text("precious")
    (outside / "log.jsonl").write_text("precious\n")
    (tmp_path / "log.jsonl").symlink_to(outside / "log.jsonl")
    (tmp_path / "ck").symlink_to(outside / "ck")
    (tmp_path / ".best.old-1-2").symlink_to(outside / "ck")
    new = tmp_path / "new"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    before = snapshot(outside)
    for write in (lambda: atomic_write_bytes(tmp_path / "log.jsonl", b"x"), lambda: append_bytes(tmp_path / "log.jsonl",
                  b"x"), lambda: replace_dir(new, tmp_path / "ck", ["model.safetensors"])):
        with pytest.raises(InputError, match="is a symbolic link"):
            write()
    assert remove_own_files(tmp_path / "ck", ["model.safetensors"]) is False
    recover_dirs(tmp_path, lambda n: n == "best", ["model.safetensors"])
    assert snapshot(outside) == before and (tmp_path / ".best.old-1-2").is_symlink()
    assert (new / "model.safetensors").read_text() == "new"
    # negative control: on the real paths the same calls do write and delete
    append_bytes(outside / "log.jsonl", b"x")
    assert (outside / "log.jsonl").read_text() == "precious\nx"
    assert remove_own_files(outside / "ck", ["model.safetensors"]) is True and not (outside / "ck").exists()


def test_export_onto_a_link_leaves_its_target_whole(tmp_path: Path, finished: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    earlier = tmp_path / "earlier"
    shutil.copytree(finished.parent / "exp", earlier)
    (tmp_path / "link").symlink_to(earlier)
    before = snapshot(earlier)
    capsys.readouterr()
    assert cli.main(["export", str(finished), str(tmp_path / "link"), "--overwrite"]) == 2
    assert "is a symbolic link" in one_error(capsys)
    assert snapshot(earlier) == before and leftovers(tmp_path) == [] and (tmp_path / "link").is_symlink()


def test_resume_never_appends_through_a_linked_log(tmp_path: Path, finished: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path)
    shutil.move(run / "log.jsonl", tmp_path / "elsewhere.jsonl")
    (run / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    before, elsewhere = snapshot(run), (tmp_path / "elsewhere.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 2
    assert "log.jsonl is a symbolic link" in one_error(capsys)
    assert snapshot(run) == before and (tmp_path / "elsewhere.jsonl").read_bytes() == elsewhere


def test_pruning_leaves_a_linked_checkpoint_and_its_target_alone(tmp_path: Path) -> None:
    run = train(tmp_path, "r", "--steps", "2", "--eval-interval", "1", "--keep-last", "5")
    shutil.move(run / "step_000001", tmp_path / "kept")
    (run / "step_000001").symlink_to(tmp_path / "kept")  # same run id: pruning would take it if it went through
    kept = snapshot(tmp_path / "kept")
    assert cli.main(["train", "--resume", str(run), "--steps", "4", "--keep-last", "1", "--no-progress"]) == 0
    assert snapshot(tmp_path / "kept") == kept and (run / "step_000001").is_symlink()
    assert not (run / "step_000002").exists() and (run / "step_000004").is_dir()  # real ones are still pruned


def test_a_run_on_symlinked_scratch_space_works(tmp_path: Path) -> None:
    """Links above the names amer writes are followed: a symlinked --out-dir (cluster scratch) is a place."""
    (tmp_path / "scratch").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "scratch")
    train(tmp_path / "runs", "r", "--steps", "2", "--eval-interval", "2", "--stop-at", "1")
    assert cli.main(["train", "--resume", str(tmp_path / "runs" / "r"), "--no-progress"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "scratch" / "r")] == ["step_000001", "step_000002"]


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_gets_the_mode_the_umask_gives(tmp_path: Path, finished: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        run = train(tmp_path, "r", "--steps", "1", "--eval-interval", "1")
        assert cli.main(["export", str(run), str(tmp_path / "exp")]) == 0
        files = [p for p in [*run.rglob("*"), *(tmp_path / "exp").rglob("*")] if p.is_file()]
        assert {p.name for p in files} >= {"model.safetensors", "optim.safetensors", "meta.json", "log.jsonl"}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
               {p.name: oct(0o666 & ~umask) for p in files}
        save_file({"w": torch.zeros(2)}, str(tmp_path / "raw.safetensors"))  # the control: safetensors alone
        assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------- full or read-only disks, odd targets


def _full_disk_at(calls: int):
    """A safetensors ``save_file`` that fails as a full disk does from its ``calls``-th call on."""
    count = {"n": 0}

    def save(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] >= calls:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f'path "{Path(filename).parent}/.tmpXYZ"')
        return save_file(tensors, filename, metadata=metadata)
    return save


def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import amer.weights as weights

    monkeypatch.setattr(weights, "save_file", _full_disk_at(4))  # step 2: model, optim, best; step 4: fails
    capsys.readouterr()
    run = train(tmp_path, "r", "--steps", "4", "--eval-interval", "2", expect=1)
    line = one_error(capsys)
    assert "step_000004/model.safetensors: No space left on device" in line and "--resume" in line
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"] and leftovers(run) == []
    assert read_checkpoint(run / "step_000002")[2]["step"] == 2 and read_checkpoint(run / "best")[2]["step"] == 2
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert read_checkpoint(run)[2]["step"] == 4


def test_a_full_disk_while_logging_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    import amer.training.log as log_mod

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(log_mod, "append_bytes", full)
    capsys.readouterr()
    train(tmp_path, "r", "--steps", "2", expect=1)
    assert "log.jsonl: No space left on device; the disk is full" in one_error(capsys)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_export_import_and_plot_on_a_refusing_disk(tmp_path: Path, finished: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture, code: int, words: str) -> None:
    import amer.fileio as fileio
    import amer.weights as weights

    def refuse(*args, **kw):
        raise OSError(code, os.strerror(code), str(args[1] if len(args) > 1 else args[0]))

    monkeypatch.setattr(weights, "save_file", refuse)
    hf = tmp_path / "hf"
    from amer import HybridLM, ModelConfig
    from amer.interop import export_transformers

    model = HybridLM(ModelConfig(pattern="AE", d_model=16, vocab_size=64, attention={"n_heads": 2},
                                 moe={"n_experts": 1, "top_k": 1, "d_ff": 32}))
    monkeypatch.undo()
    export_transformers(model, model.cfg, hf)
    monkeypatch.setattr(weights, "save_file", refuse)
    monkeypatch.setattr(fileio.os, "replace", refuse)  # what atomic_write_bytes (plot's PNG) renames with
    for argv in (["export", str(finished), str(tmp_path / "exp")], ["import", str(hf), str(tmp_path / "imp")],
                 ["plot", str(finished), "--out", str(tmp_path / "c.png")]):
        capsys.readouterr()
        assert cli.main(argv) == 1, argv
        assert words in one_error(capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "nothing half-written is left behind"


def test_a_real_full_disk(tmp_path: Path) -> None:
    """A 1.2 MB tmpfs holds the first checkpoint (step 2 and best/) but not the second: one line, exit 1, the first
    checkpoint whole, nothing half-written, and the copied run resumes where it stopped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1200k tmpfs {disk} || exit 77; {sys.executable} -m amer.cli "
              + " ".join(TRAIN) + f" --out-dir {disk} --run-name r --steps 4 --eval-interval 2; "
              f"echo $? > {tmp_path}/rc; cp -a {disk}/r {tmp_path}/r")
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):  # a private mount namespace: nothing to clean up
        if shutil.which(prefix[0]) is None:
            continue
        proc = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        if (tmp_path / "rc").exists():
            break
    else:
        pytest.skip("no tmpfs can be mounted here (needs unshare with user namespaces, or root); the simulated "
                    "full-disk tests above cover the same paths")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert (tmp_path / "rc").read_text().strip() == "1", proc.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in proc.stderr
    run = tmp_path / "r"
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"] and leftovers(run) == []
    read_checkpoint(run / "step_000002")
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_a_busy_mount_point_is_refused_before_anything_moves(tmp_path: Path, finished: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "mnt"
    shutil.copytree(finished.parent / "exp", target)
    before = snapshot(target)
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target or real(p))
    capsys.readouterr()
    assert cli.main(["export", str(finished), str(target), "--overwrite"]) == 2
    assert "is a mount point" in one_error(capsys)
    assert snapshot(target) == before and leftovers(tmp_path) == []


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(tmp_path, "r", "--tokenizer", str(tmp_path / "nope.json"), expect=2)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- non-finite weights are refused on load


def test_non_finite_weights_are_refused_by_name() -> None:
    good = {"a": torch.ones(3), "ids": torch.arange(3), "big": torch.full((10,), 3e38)}  # big: its sum overflows
    check_finite(good)  # the sum's overflow only sends it to the exact check, which passes
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")):
        w = {**good, "b.weight": torch.tensor([1.0, bad])}
        with pytest.raises(CheckpointError, match=f"weight b.weight holds {what} values"):
            check_finite(w, "ck")


# ---------------------------------------------------------------- relative paths in a run's config


def test_a_run_resumes_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "d.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n"
                                                    for i in range(40)))
    monkeypatch.chdir(tmp_path / "a")
    assert cli.main([*TRAIN, "--data", "d.jsonl", "--out-dir", "runs", "--run-name", "r", "--steps", "2",
                     "--stop-at", "1", "--eval-interval", "1"]) == 0
    config = json.loads((tmp_path / "a" / "runs" / "r" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "a" / "d.jsonl") and config["out_dir"] == str(tmp_path / "a" / "runs")
    monkeypatch.chdir(tmp_path / "b")
    assert cli.main(["train", "--resume", "../a/runs/r", "--no-progress"]) == 0
    assert read_checkpoint(tmp_path / "a" / "runs" / "r")[2]["step"] == 2


def test_every_json_read_and_weight_write_goes_through_the_guarded_helpers() -> None:
    """JSON is parsed by ``amer.fileread.json_loads`` (nesting past the recursion limit is a ValueError, so every
    reader's one-line error covers it) and weights are written by ``amer.weights.save_tensors`` (a full disk is an
    OSError, the mode follows the umask): a new direct call elsewhere would bring a traceback or a 0600 file back."""
    import re

    rules = {re.compile(r"\bjson\.loads?\("): "fileread.py", re.compile(r"\bsave_file\("): "weights.py"}
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "amer").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            for rule, home in rules.items() if p.name != home and rule.search(line)]
    assert hits == []
    assert all(rule.search(s) for rule, s in zip(rules, ["json.loads(x)", "save_file(t, p)"]))  # the rules bite
