"""Pretrained folders (``save_pretrained`` / ``from_pretrained`` / ``amer export``) and fine-tuning with ``--init``.

The round trip that matters is across processes: a folder exported here is loaded by a fresh interpreter that
knows nothing of this one, and must give the same logits bit for bit. ``--init`` must start from the weights
(the first step's loss is the loaded model's loss) with a fresh optimizer and schedule, and a resumed ``--init``
run must continue from its own checkpoint, not reload the initial weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import amer.cli.train as train_cli
from amer.checkpoint import load_checkpoint, read_checkpoint
from amer.cli import main as amer_main
from amer.config import ModelConfig, from_dict
from amer.errors import CheckpointError, InputError
from amer.hub import is_pretrained_folder, save_pretrained
from amer.model import HybridLM
from amer.pattern import load_preset

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int = 0, **over: object) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(from_dict(ModelConfig, {**load_preset("tiny")["model"], **over})).eval()


def train(out: Path, name: str, *extra: str, expect: int = 0) -> Path:
    argv = ["--preset", "tiny", "--out-dir", str(out), "--run-name", name, "--no-progress", "--no-tensorboard",
            "--no-curves", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", *extra]
    assert train_cli.main(argv) == expect
    return out / name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("runs"), "base", "--steps", "6", "--eval-interval", "3")


def test_save_and_load_in_process_identical_logits(tmp_path: Path) -> None:
    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "amer" and config["architectures"] == ["HybridLM"]
    assert config["model"]["pattern"] == model.cfg.pattern
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied: stored once, like transformers
    loaded = HybridLM.from_pretrained(folder)
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied after loading


def test_untied_head_round_trip(tmp_path: Path) -> None:
    model = tiny_model(tie_embeddings=False)
    loaded = HybridLM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert "lm_head.weight" in load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_export_then_load_in_a_fresh_process(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert amer_main(["export", str(run_dir), str(out)]) == 0
    assert is_pretrained_folder(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 6
    model, _ = load_checkpoint(run_dir)  # the latest step
    torch.save(TOKENS, tmp_path / "tokens.pt")
    # What is promised: the same weights give the same logits at the same thread count (a reduction split over
    # another number of threads rounds differently, on some CPUs and not others).
    script = ("import sys, torch; torch.set_num_threads(int(sys.argv[4])); from amer.model import HybridLM; "
              "m = HybridLM.from_pretrained(sys.argv[1]); t = torch.load(sys.argv[2]); "
              "torch.save(m(t).logits, sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "l.pt"),
                    str(torch.get_num_threads())], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "l.pt"), model(TOKENS).logits)


def test_exported_folder_is_a_checkpoint_everywhere(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    assert amer_main(["export", str(run_dir), str(out)]) == 0
    weights, optim, meta = read_checkpoint(out)
    assert optim is None and meta["step"] is None and meta["config"]["model"]["pattern"] == "AEMR"
    capsys.readouterr()
    assert amer_main(["sample", "--checkpoint", str(out), "--prompt", "In the", "--max-new-tokens", "8",
                      "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("In the")


def test_export_refuses_to_overwrite(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    assert amer_main(["export", str(run_dir), str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert amer_main(["export", str(run_dir / "step_000003"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert amer_main(["export", str(run_dir / "step_000003"), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != before  # step 3's weights now
    # a folder with the user's own files in it is never replaced, --overwrite or not
    (out / "notes.txt").write_text("mine")
    assert amer_main(["export", str(run_dir), str(out), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="not an amer model"):
        other = tmp_path / "hf"
        other.mkdir()
        (other / "config.json").write_text('{"model_type": "llama"}')
        save_pretrained(tiny_model(), other)


def test_loading_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        HybridLM.from_pretrained(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="amer import"):
        HybridLM.from_pretrained(tmp_path / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # an owner/name that is not a local path means the Hub; offline, that fails with one line
        with pytest.raises(CheckpointError, match="downloading it from the Hub failed"):
            HybridLM.from_pretrained("nobody-here/no-such-model")
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_push_to_hub_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in tests: a stand-in for HfApi records what would be uploaded."""
    import huggingface_hub

    calls: list[tuple[str, object]] = []

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls.append(("token", token))

        def create_repo(self, repo_id: str, private: bool | None = None, exist_ok: bool = False) -> None:
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> str:
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir())))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny_model().push_to_hub("me/tiny", token="t")
    assert url.endswith("/commit/0")
    assert calls == [("token", "t"), ("create", "me/tiny"), ("upload", ["config.json", "model.safetensors"])]


# ---------------------------------------------------------------- fine-tuning with --init


def test_init_starts_from_the_weights_with_a_fresh_schedule(run_dir: Path, tmp_path: Path) -> None:
    base, _ = load_checkpoint(run_dir)
    tuned = train(tmp_path, "tuned", "--init", str(run_dir), "--steps", "2", "--eval-interval", "2",
                  "--log-interval", "1", "--warmup-steps", "2", "--lr", "1e-3")
    config = json.loads((tuned / "config.json").read_text())
    assert config["init"] == str(run_dir)
    assert (config["model"]["pattern"], config["model"]["d_model"]) == (base.cfg.pattern, base.cfg.d_model)
    first = json.loads((tuned / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == pytest.approx(5e-4)  # warm-up from step 0: a fresh schedule
    # step 1's loss is measured before its update, on the initial weights: the loaded model's, not a fresh one's
    fresh = train(tmp_path, "fresh", "--steps", "1", "--eval-interval", "1", "--log-interval", "1")
    fresh_ce = json.loads((fresh / "log.jsonl").read_text().splitlines()[0])["ce"]
    assert first["ce"] < fresh_ce - 0.05


def test_init_from_a_pretrained_folder_and_resume(run_dir: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(run_dir)
    folder = model.save_pretrained(tmp_path / "pre")
    full = train(tmp_path, "full", "--init", str(folder), "--steps", "4", "--eval-interval", "2")
    part = train(tmp_path, "part", "--init", str(folder), "--steps", "4", "--eval-interval", "2", "--stop-at", "2")
    assert train_cli.main(["--resume", str(part), "--no-progress", "--no-tensorboard", "--no-curves"]) == 0
    a = read_checkpoint(full / "step_000004")[0]
    b = read_checkpoint(part / "step_000004")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_errors(run_dir: Path, tmp_path: Path, capsys) -> None:
    train(tmp_path, "x", "--init", str(tmp_path / "nope"), "--steps", "1", expect=2)
    assert "not found" in capsys.readouterr().err
    train(tmp_path, "y", "--init", str(run_dir), "--pattern", "AM", "--steps", "1", expect=2)
    assert "--pattern cannot be combined with --init" in capsys.readouterr().err
    # a shape change on top of the checkpoint's model fails when the weights load, naming the tensor
    train(tmp_path, "z", "--init", str(run_dir), "--model.d-model", "48", "--steps", "1", expect=2)
    assert "has shape" in capsys.readouterr().err


def test_export_transformers_format(tmp_path: Path, capsys) -> None:
    """``--format transformers`` from the command line: a dense (AE)*2 model becomes a Llama folder that
    transformers loads with the same logits; a pattern no transformers class expresses is one line, exit 2."""
    transformers = pytest.importorskip("transformers")
    dense = tiny_model(pattern="AEAE", moe={"n_experts": 1, "top_k": 1})
    dense.save_pretrained(tmp_path / "dense")
    assert amer_main(["export", str(tmp_path / "dense"), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - dense(TOKENS).logits).abs().max() < 1e-4
    tiny_model().save_pretrained(tmp_path / "hybrid")
    capsys.readouterr()
    assert amer_main(["export", str(tmp_path / "hybrid"), str(tmp_path / "hf2"), "--format", "transformers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "hf2").exists()
