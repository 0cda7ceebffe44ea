"""``amer curvature`` on imported pretrained models: two hybrid transformers classes (Bamba, GraniteMoeHybrid),
random-initialised and saved with transformers, each with its own BPE ``tokenizer.json``, measured on a text file
after ``amer import`` and straight from the transformers folder (the same numbers either way)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from amer.cli import main as cli_main

transformers = pytest.importorskip("transformers")
tk = pytest.importorskip("tokenizers")

VOCAB = 128
HYBRID = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2,
              mamba_chunk_size=8, initializer_range=0.1)
SOURCES = {
    "BambaForCausalLM": ("BambaConfig", dict(attn_layer_indices=[1])),
    "GraniteMoeHybridForCausalLM": ("GraniteMoeHybridConfig",
                                    dict(layer_types=["mamba", "attention", "mamba", "mamba"], num_local_experts=4,
                                         num_experts_per_tok=2, shared_intermediate_size=40)),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    words = ("in the beginning was the word and the word was with god light darkness over the face of deep "
             "waters spirit moved upon").split()
    paragraphs = ["\n".join(" ".join(rng.choice(words, size=12)) for _ in range(4)) for _ in range(120)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def bpe_tokenizer(folder: Path, text: Path) -> int:
    """A small BPE (whitespace words, its own merges) with the special tokens a hub tokenizer has; returns its
    vocabulary size."""
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    trainer = tk.trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(text.read_text().splitlines(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def source(root: Path, cls: str, text: Path) -> Path:
    cfg_cls, extra = SOURCES[cls]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**HYBRID, **extra)).float().eval()
    folder = root / cls
    model.save_pretrained(folder)
    assert bpe_tokenizer(folder, text) <= VOCAB
    return folder


def curvature(args: list[str], out: Path, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    rc = cli_main(["curvature", *args, "--batches", "2", "--batch-size", "4", "--seq-len", "32", "--n-bootstrap",
                   "50", "--strides", "1,2", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "checks at stride 1" in captured.out
    return json.loads((out / "curvature.json").read_text())


@pytest.mark.parametrize("cls", sorted(SOURCES))
def test_curvature_of_an_imported_hybrid_with_its_tokenizer(cls: str, tmp_path: Path, text: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    src = source(tmp_path, cls, text)
    assert cli_main(["import", str(src), str(tmp_path / "amer")]) == 0
    assert (tmp_path / "amer" / "tokenizer.json").is_file()
    capsys.readouterr()
    report = curvature(["--checkpoint", str(tmp_path / "amer"), "--data", str(text)], tmp_path / "curv", capsys)
    res, cfg = report["result"], report["config"]
    assert res["pattern"] == "MEAEMEME"
    assert cfg["tokenizer"] != "byte" and "tokenizer.json" in cfg["tokenizer"]  # the folder's own BPE
    assert {"M->E", "E->A", "A->E", "E->M", "E->final", "embed->M"} == set(res["boundary_types"])
    for layer in res["layers"]:
        assert layer["token"]["1"]["mean"] is not None and layer["token_deg"]["2"]["mean"] is not None
        assert layer["baselines"]["1"]["shuffled"]["mean"] is not None
        assert layer["anisotropy"]["whitening_rank"] >= 1
        assert layer["entropy"]["1"]["angle"]["n"] > 0
    assert res["next_token_entropy"]["mean"] > 0
    assert set(res["families"]) == {"A", "M", "E"}
    # straight from the transformers folder: converted in memory, the same model, tokenizer and numbers
    direct = curvature(["--checkpoint", str(src), "--data", str(text)], tmp_path / "direct", capsys)["result"]
    for a, b in zip(res["layers"], direct["layers"]):
        assert a["token"]["1"]["mean"] == pytest.approx(b["token"]["1"]["mean"], abs=1e-6)
        assert a["entropy"]["1"]["angle"]["r"] == pytest.approx(b["entropy"]["1"]["angle"]["r"], abs=1e-6)
    assert direct["data_fingerprint"] == res["data_fingerprint"]


def test_a_transformers_folder_compares_with_its_import(tmp_path: Path, text: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """--compare takes either form; a model against its own import differs by nothing."""
    src = source(tmp_path, "BambaForCausalLM", text)
    assert cli_main(["import", str(src), str(tmp_path / "amer")]) == 0
    capsys.readouterr()
    report = curvature(["--checkpoint", str(tmp_path / "amer"), "--compare", str(src), "--data", str(text),
                        "--no-anisotropy", "--units", "angle"], tmp_path / "cmp", capsys)
    comp = report["comparison"]
    assert comp["paired"]
    for layer in comp["layers"]:
        assert abs(layer["token_deg"]["1"]["diff"]) < 1e-4 and not layer["token_deg"]["1"]["excludes_zero"]
    md = (tmp_path / "cmp" / "curvature.md").read_text()
    assert "angle (°)" in md and "[1 - cos]" not in md and "## Anisotropy" not in md
