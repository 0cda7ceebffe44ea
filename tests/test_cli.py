"""Command lines: `python train.py` / `amer train` configuration and errors, and `amer sample`.

Every mistake a user can type must come back as exit code 2 and ONE line on stderr naming the problem
(and, for a misspelt name, the closest valid one), never a traceback and never a half-created run.
Configuration layers (preset < --config TOML < flags) must resolve in that order and the resolved
config must be what the checkpoint records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import amer.cli as cli
import amer.cli.train as train_cli
import amer.training.loop as loop_mod
from amer.config import TrainConfig, options, to_dict

REPO = Path(__file__).resolve().parents[1]


def expect_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str, entry=train_cli.main) -> str:
    """Run an entry point, require exit 2 and a single 'error: ...' line on stderr containing ``needles``."""
    rc = entry(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, f"{argv}: exit {rc}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv}: stderr {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{argv}: {needle!r} not in {lines[0]!r}"
    return lines[0]


def quick(out: Path, name: str = "r") -> list[str]:
    return ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("argv, needles", [
    (["--stepz", "5"], ["--stepz", "did you mean '--steps'"]),
    (["--stepz=5"], ["did you mean '--steps'"]),
    (["--step", "5"], ["unknown option --step", "did you mean '--steps'"]),  # no silent abbreviations
    (["--stp.start_stepp", "3"], ["did you mean '--stp.start-step'"]),
    (["--model.d-modl", "64"], ["did you mean '--model.d-model'"]),
    (["stray"], ["unexpected argument 'stray'"]),
    (["--steps", "abc"], ["--steps", "invalid int value: 'abc'"]),
    (["--dtype", "float16"], ["--dtype", "float32", "bfloat16"]),
    (["--preset", "tinny"], ["no preset named 'tinny'", "did you mean 'tiny'"]),
    (["--preset", "tiny", "--pattern", "AXM"], ["'X'", "position 1", "A (attention)"]),
    (["--preset", "tiny", "--stp.layers", "A1"], ["stp.layers", "'A1' selects nothing", "A0"]),
    (["--preset", "tiny", "--pattern", "AAM", "--stp.layers", "E-1"], ["stp.layers", "E-1"]),
    (["--preset", "tiny", "--seq-len", "2"], ["seq_len", ">= 3", "got 2"]),
    (["--preset", "tiny", "--stp.weight", "-1"], ["stp.weight must be a finite number >= 0", "got -1"]),
    (["--preset", "tiny", "--device", "tpu"], ["--device", "cpu"]),
    (["--preset", "tiny", "--stop-at", "99"], ["--stop-at", "between 1 and --steps (40)"]),
    (["--config", "/nonexistent/run.toml"], ["config file not found", "/nonexistent/run.toml"]),
    (["--resume", "/nonexistent/run"], ["checkpoint not found", "/nonexistent/run"]),
])
def test_bad_command_lines_fail_in_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
                                            needles: list[str]) -> None:
    expect_error(capsys, [*argv, "--out-dir", str(tmp_path), "--no-progress"], *needles)
    assert list(tmp_path.iterdir()) == [], "a failed start must not create a run directory"


def test_unknown_toml_key_suggests_closest(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    top = tmp_path / "top.toml"
    top.write_text('preset = "tiny"\nstepz = 5\n')
    expect_error(capsys, ["--config", str(top)], "unknown key 'stepz'", "did you mean 'steps'")
    nested = tmp_path / "nested.toml"
    nested.write_text('preset = "tiny"\n[stp]\nstart_stepp = 5\n')
    expect_error(capsys, ["--config", str(nested)], "'stp.start_stepp'", "did you mean 'start_step'")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    expect_error(capsys, ["--config", str(broken)], str(broken), "invalid TOML")


def test_missing_and_too_small_data(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    expect_error(capsys, quick(tmp_path) + ["--data", str(tmp_path / "nope.txt")], "nope.txt", "does not exist")
    small = tmp_path / "small.txt"
    small.write_text("hello world\n")
    # 12 bytes + BOS/EOS = 14 tokens; two rows of seq_len + 1 = 33 are needed
    expect_error(capsys, quick(tmp_path) + ["--data", str(small)], "has 14 tokens", "66 tokens")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    expect_error(capsys, quick(tmp_path) + ["--data", str(empty)], "empty.jsonl", "no non-empty documents")
    assert not (tmp_path / "r").exists()


def test_existing_run_directory_is_never_overwritten(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text("precious\n")
    expect_error(capsys, quick(tmp_path), "already exists", "not created by amer train", "--run-name")
    expect_error(capsys, [*quick(tmp_path), "--overwrite"], "not created by amer train")
    expect_error(capsys, ["--resume", str(run_dir)], "not a run directory amer train created")
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.jsonl"]
    assert (run_dir / "log.jsonl").read_text() == "precious\n"


# ---------------------------------------------------------------- help


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    assert train_cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    flags = ["--" + o.key.replace("_", "-") for o in options(TrainConfig)] + ["--config", "--stop-at"]
    parser = train_cli.build_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[0] in text
        # a real sentence, not the field name echoed back
        assert action.help and action.help != action.dest.replace("_", " ") and len(action.help) >= 10, action.dest
    assert all(f in text for f in flags)
    assert "comma-separated selectors" in text and "'A-1,M-1,E-1,R-1'" in text  # --stp.layers
    assert "--stp.start-step" in text and "STP coefficient is 0 for optimizer steps before" in text
    assert "--model.d-model" in text and "residual stream width" in text
    assert "--dtype {float32,bfloat16}" in text and "--model.moe.dispatch {dropless,capacity}" in text


def test_train_help_exits_zero_from_both_entry_points(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--help"]) == 0
    assert "--stp.layers" in capsys.readouterr().out
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0 and "--stp.start-step" in res.stdout and res.stderr == ""


def test_amer_without_command_and_unknown_command(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0 and "sample" in capsys.readouterr().out
    expect_error(capsys, ["trian"], "unknown command 'trian'", "did you mean 'train'", entry=cli.main)


def test_progress_without_a_terminal_prints_log_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Piped output (nohup, CI) has no progress bar; the user must still see the loss go by."""
    argv = [a for a in quick(tmp_path) if a != "--no-progress"] + ["--steps", "2", "--log-interval", "1"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "step 1/2 loss" in out and "step 2/2 loss" in out and "tok/s" in out
    assert f"run directory: {tmp_path / 'r'}" in out and "done: checkpoint" in out


# ---------------------------------------------------------------- precedence


def test_config_precedence_preset_then_toml_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 7\nlr = 0.001\nseq_len = 32\n'
                    '[stp]\nstart_step = 3\nweight = 0.05\n[model]\nd_model = 48\n')
    cfg, extras = train_cli.resolve_config(["--config", str(toml), "--steps", "3", "--stp.start-step", "1",
                                            "--out-dir", str(tmp_path), "--run-name", "r", "--no-progress",
                                            "--no-tensorboard", "--no-curves", "--batch-size", "2",
                                            "--eval-batches", "1"])
    assert extras["config"] == str(toml)
    assert cfg.preset == "tiny"
    assert cfg.steps == 3 and cfg.stp.start_step == 1  # flag beats TOML
    assert cfg.lr == 0.001 and cfg.stp.weight == 0.05 and cfg.model.d_model == 48  # TOML beats preset
    assert cfg.warmup_steps == 5 and cfg.stp.layers == "A-1,M-1,E-1,R-1"  # preset fills the rest
    assert cfg.model.mamba.d_state == 16 and cfg.model.moe.n_experts == 4  # nested tables merge, not replace

    loop_mod.train(cfg, quiet=True)
    run = tmp_path / "r"
    saved = json.loads((run / "config.json").read_text())
    assert saved == {**to_dict(cfg), "resume": None}
    meta = json.loads((run / "step_000003" / "meta.json").read_text())
    assert meta["config"] == saved


def test_pattern_flag_overrides_preset_pattern() -> None:
    cfg, _ = train_cli.resolve_config(["--preset", "tiny", "--pattern", "AMR", "--stp.layers", "A-1,R-1"])
    assert cfg.model.pattern == "AMR" and cfg.stp.layers == "A-1,R-1" and cfg.model.d_model == 32


# ---------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    assert train_cli.main(quick(out) + ["--steps", "4", "--eval-interval", "4"]) == 0
    return out / "r"


def test_sample_greedy_prints_text_and_speed(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["sample", "--checkpoint", str(checkpoint), "--prompt", "In the", "--max-new-tokens", "20",
            "--temperature", "0"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("In the") and len(first.out.rstrip("\n")) > len("In the")
    assert "tokens/s" in first.err and "20 tokens" in first.err
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first.out, "greedy decoding must be deterministic"


def test_sample_top_k_runs_and_is_seeded(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["sample", "--checkpoint", str(checkpoint), "--prompt", "And", "--max-new-tokens", "12",
            "--temperature", "1.0", "--top-k", "5", "--seed", "3"]
    assert cli.main(argv) == 0
    a = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == a and a.startswith("And")


@pytest.mark.parametrize("argv, needles", [
    (["--checkpoint", "/nonexistent/ckpt"], ["checkpoint not found", "/nonexistent/ckpt"]),
    (["--checkpoint", "CKPT", "--top-k", "0"], ["--top-k must be an integer >= 1, got 0"]),
    (["--checkpoint", "CKPT", "--max-new-tokens", "0"], ["--max-new-tokens must be an integer >= 1, got 0"]),
    (["--checkpoint", "CKPT", "--device", "tpu"], ["--device"]),
    (["--checkpoint", "CKPT", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["--prompt", "x"], ["--checkpoint"]),
])
def test_sample_errors(checkpoint: Path, capsys: pytest.CaptureFixture, argv: list[str],
                       needles: list[str]) -> None:
    argv = [str(checkpoint) if a == "CKPT" else a for a in argv]
    expect_error(capsys, ["sample", *argv], *needles, entry=cli.main)


def test_sample_names_a_corrupt_checkpoint_file(tmp_path: Path, checkpoint: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint / "step_000004", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    expect_error(capsys, ["sample", "--checkpoint", str(bad)], str(bad / "model.safetensors"), entry=cli.main)
