"""Checkpoints: atomic writes, loud failures on damaged files, exact round trips, load_checkpoint.

A checkpoint is what a user keeps after hours of training, so the tests attack the ways it gets lost:
a write killed part-way (the previous checkpoint must survive and no half directory may carry a real
name), a truncated or hand-edited file (the error must name the file, not dump a traceback from
safetensors), NaN weights (never written), and a reload that silently differs from what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import amer
import amer.cli.train as train_cli
import amer.training.loop as loop_mod
from amer.checkpoint import (
    CheckpointError,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    restore_model,
    restore_optimizer,
    save_checkpoint,
)
from amer.config import ModelConfig, from_dict, to_dict
from amer.model import HybridLM
from amer.pattern import load_preset


def tiny_model(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(from_dict(ModelConfig, load_preset("tiny")["model"]))


def trained_pair(seed: int = 0) -> tuple[HybridLM, torch.optim.AdamW]:
    """A tiny model after two AdamW steps, so the optimizer has real moments to save."""
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        model(tokens).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def meta_for(model: HybridLM, step: int) -> dict:
    return {"config": {"model": to_dict(model.cfg)}, "step": step}


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- round trip


def test_save_read_round_trip_is_exact(tmp_path: Path) -> None:
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path / "step_000002", model, opt, meta_for(model, 2))
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim.safetensors"]
    weights, optim, meta = read_checkpoint(path)
    assert meta["step"] == 2 and meta["amer_version"] == amer.__version__

    fresh = tiny_model(seed=1)
    restore_model(fresh, weights)
    assert weights_equal(fresh.state_dict(), model.state_dict())
    # tied embedding / LM head: stored once, still tied after loading
    assert "lm_head.weight" not in weights
    assert fresh.lm_head.weight.data_ptr() == fresh.embed.weight.data_ptr()

    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restore_optimizer(fresh_opt, optim, meta)
    got, want = fresh_opt.state_dict(), opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for pid, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][pid][k], v), (pid, k)


def test_find_checkpoint_picks_latest_step_of_a_run(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (3, 12, 7):
        save_checkpoint(tmp_path / f"step_{step:06d}", model, None, meta_for(model, step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000007", "step_000012"]
    assert find_checkpoint(tmp_path).name == "step_000012"
    assert find_checkpoint(tmp_path / "step_000007").name == "step_000007"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        find_checkpoint(tmp_path / "no_such_run")


def test_empty_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in .*step_"):
        find_checkpoint(tmp_path)


# ---------------------------------------------------------------- atomic writes


def _fail_after_first_save(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make safetensors' save_file write its first file, then fail as it does on a full disk: with its own
    SafetensorError, which amer.weights raises as the OSError it is."""
    from safetensors import SafetensorError

    import amer.weights as weights_mod

    real = weights_mod.save_file
    written: list[str] = []

    def flaky(tensors, filename, *a, **kw):
        if written:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        written.append(filename)
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(weights_mod, "save_file", flaky)
    return written


def test_interrupted_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained_pair()
    save_checkpoint(tmp_path / "step_000001", model, opt, meta_for(model, 1))
    before = read_checkpoint(tmp_path)[0]

    with torch.no_grad():  # the new checkpoint would hold different weights
        for p in model.parameters():
            p.add_(1.0)
    written = _fail_after_first_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "step_000002", model, opt, meta_for(model, 2))
    assert written, "the fault must strike after a file was written, i.e. part-way"

    assert not (tmp_path / "step_000002").exists(), "a partial checkpoint under a real name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"], "temporary directory left behind"
    assert find_checkpoint(tmp_path).name == "step_000001"
    weights, _, meta = read_checkpoint(tmp_path)
    assert meta["step"] == 1 and weights_equal(weights, before)
    loaded, _ = load_checkpoint(tmp_path)
    assert weights_equal({k: v for k, v in loaded.state_dict().items() if k in before}, before)


def test_interrupted_replace_keeps_old_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """best/ is rewritten in place; a failed rewrite must leave the old best/ whole."""
    model, opt = trained_pair()
    save_checkpoint(tmp_path / "best", model, opt, meta_for(model, 5))
    before = read_checkpoint(tmp_path / "best")[0]
    with torch.no_grad():
        model.embed.weight.zero_()
    _fail_after_first_save(monkeypatch)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "best", model, opt, meta_for(model, 9))
    weights, _, meta = read_checkpoint(tmp_path / "best")
    assert meta["step"] == 5 and weights_equal(weights, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_successful_replace_swaps_in_new_contents(tmp_path: Path) -> None:
    model, _ = trained_pair()
    save_checkpoint(tmp_path / "best", model, None, meta_for(model, 5))
    save_checkpoint(tmp_path / "best", model, None, meta_for(model, 9))
    assert read_checkpoint(tmp_path / "best")[2]["step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_refuses_to_write_non_finite_weights(tmp_path: Path) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.blocks[2].mixer.parameters().__next__()[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "step_000001", model, None, meta_for(model, 1))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, opt = trained_pair()
    return save_checkpoint(tmp_path / "run" / "step_000004", model, opt, meta_for(model, 4))


@pytest.mark.parametrize("fname", ["model.safetensors", "optim.safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_safetensors_names_the_file(saved: Path, fname: str, keep: float) -> None:
    f = saved / fname
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(saved.parent)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    if fname == "model.safetensors":
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_checkpoint(saved.parent)
    else:  # inference never reads the optimizer: a damaged optim file does not block sampling
        load_checkpoint(saved.parent)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_model_section"])
def test_corrupt_meta_json_names_the_file(saved: Path, damage: str) -> None:
    meta = saved / "meta.json"
    text = meta.read_text()
    meta.write_text({"truncate": text[: len(text) // 2], "garbage": "\x00\x01not json",
                     "no_model_section": json.dumps({"step": 4, "config": {}})}[damage])
    with pytest.raises(CheckpointError, match="meta.json") as e:
        load_checkpoint(saved)
    assert "\n" not in str(e.value)


def test_missing_weights_file_is_named(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved)


def test_weights_for_another_model_are_refused(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    meta["config"]["model"]["d_model"] = 64
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(saved)


# ---------------------------------------------------------------- a trained run


def test_load_checkpoint_reproduces_the_trained_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[HybridLM] = []

    class Recording(HybridLM):
        def __init__(self, cfg: ModelConfig) -> None:
            super().__init__(cfg)
            built.append(self)

    monkeypatch.setattr(loop_mod, "HybridLM", Recording)
    rc = train_cli.main(["--preset", "tiny", "--out-dir", str(tmp_path), "--run-name", "r", "--no-progress",
                         "--no-tensorboard", "--no-curves", "--steps", "5", "--batch-size", "2", "--seq-len", "32",
                         "--eval-interval", "1", "--eval-batches", "1", "--keep-last", "2"])
    assert rc == 0
    run = tmp_path / "r"
    # keep_last=2 step checkpoints plus best/
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["best", "step_000004", "step_000005"]

    (trained,) = built
    rng = torch.get_rng_state()
    model, cfg = amer.load_checkpoint(run)
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device: no initialisation drawn, no copy
    assert model.lm_head.weight is model.embed.weight and not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.blocks[0].mixer.inv_freq, trained.blocks[0].mixer.inv_freq)  # computed, not saved
    assert not model.training
    assert cfg == trained.cfg and cfg.pattern == "AEMR"
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    trained.eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, trained(tokens).logits)

    meta = json.loads((run / "step_000005" / "meta.json").read_text())
    assert meta["step"] == 5 and set(meta) >= {"config", "rng", "data_state", "amer_version", "best_val", "optimizer"}
    assert meta["config"] == json.loads((run / "config.json").read_text())
