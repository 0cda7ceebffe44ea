"""Importing transformers checkpoints: every supported class gives the same logits in amer, on a batch and
step by step through amer's decoding caches.

Each test builds a small random-initialised transformers model (fp32), saves it with ``save_pretrained``,
imports the folder (amer reads it without transformers) and compares logits. Norm gains and biases are
perturbed away from their 1 / 0 initialisation so a weight mapped to the wrong place shows up.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from amer.errors import CheckpointError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
B, T = 2, 12
VOCAB = 64


def build_source(path: Path, cls: str, cfg_cls: str, seed: int = 0, **kw: Any) -> Any:
    """A random transformers model saved to ``path``; 1-D weights (norms, biases) perturbed."""
    torch.manual_seed(seed)
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("initializer_range", 0.1)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "A_log" not in name and not name.endswith(".D"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_logits(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits.float()


def decode_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """amer's logits for ``ids`` token by token through its decoding caches."""
    cache, steps = model.init_cache(ids.shape[0], ids.shape[1]), []
    for t in range(ids.shape[1]):
        out = model(ids[:, t:t + 1], taps=False, cache=cache)
        cache = out.cache
        steps.append(out.logits)
    return torch.cat(steps, 1)


def assert_same_function(hf: Any, path: Path, atol: float = ATOL) -> tuple[float, float]:
    """amer's forward and its step-by-step decoding both match the source's logits to ``atol``; returns the max abs
    differences (forward, decode)."""
    model, _ = from_transformers(path)
    ids = tokens()
    ref = reference_logits(hf, ids)
    assert ref.abs().max() > 0.05, "reference logits too small to compare"
    with torch.no_grad():
        fwd = (model(ids, taps=False).logits - ref).abs().max().item()
        dec = (decode_logits(model, ids) - ref).abs().max().item()
    assert fwd <= atol, f"forward logits differ by {fwd}"
    assert dec <= atol, f"decoded logits differ by {dec}"
    print(f"{type(hf).__name__}: forward {fwd:.2e} decode {dec:.2e}")
    return fwd, dec


def assert_same_function_and_control(hf: Any, path: Path, perturb: str, atol: float = 1e-5) -> tuple[float, float]:
    """:func:`assert_same_function` to ``atol``, then the negative control: the source weight ``perturb`` changed in
    the folder, the import no longer matches."""
    fwd, dec = assert_same_function(hf, path, atol)
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    assert perturb in weights, sorted(weights)
    weights[perturb] = weights[perturb] + 0.5 * torch.randn_like(weights[perturb])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    moved, _ = from_transformers(path)
    ids = tokens()
    with torch.no_grad():
        diff = (moved(ids, taps=False).logits - reference_logits(hf, ids)).abs().max().item()
    assert diff > 100 * atol, f"perturbing {perturb} moved the logits by only {diff}"
    return fwd, dec


def edit_config(path: Path, **changes: Any) -> None:
    conf = json.loads((path / "config.json").read_text())
    conf.update(changes)
    (path / "config.json").write_text(json.dumps(conf))


def assert_refused(path: Path, edit: dict[str, Any], message: str) -> None:
    """The folder at ``path``, its config edited, is refused by the import in one line matching ``message``."""
    edit_config(path, **edit)
    with pytest.raises(CheckpointError, match=message) as info:
        from_transformers(path)
    assert "\n" not in str(info.value)


LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("tied", [False, True])
def test_llama(tmp_path: Path, tied: bool) -> None:
    hf = build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=tied, **LLAMA)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(AE)*3" and cfg.moe.n_experts == 1 and cfg.tie_embeddings == tied
    # a config.json that does not say: tied exactly when the folder stores no separate LM head
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path)[1].tie_embeddings == tied


def test_llama_attention_bias(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", attention_bias=True, **LLAMA)
    assert_same_function(hf, tmp_path)


def test_mistral_sliding_window(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "MistralForCausalLM", "MistralConfig", sliding_window=4, **LLAMA)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.attention.window == 4


def test_qwen3_qk_norm(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "Qwen3ForCausalLM", "Qwen3Config", head_dim=16, tie_word_embeddings=True, **LLAMA)
    assert_same_function(hf, tmp_path)


def test_qwen2_qkv_bias(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "Qwen2ForCausalLM", "Qwen2Config", **LLAMA)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.attention.qkv_bias and not cfg.attention.out_bias


@pytest.mark.parametrize("top_k", [2, 1])
def test_mixtral(tmp_path: Path, top_k: int) -> None:
    hf = build_source(tmp_path, "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=top_k,
                      **LLAMA)
    assert_same_function(hf, tmp_path)


MAMBA2 = dict(hidden_size=32, num_hidden_layers=3, state_size=16, head_dim=16, num_heads=4, n_groups=2, expand=2,
              chunk_size=8)


@pytest.mark.parametrize("tied", [False, True])
def test_mamba2(tmp_path: Path, tied: bool) -> None:
    hf = build_source(tmp_path, "Mamba2ForCausalLM", "Mamba2Config", tie_word_embeddings=tied, **MAMBA2)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(M)*3"


def test_unimported_weights_are_an_error(tmp_path: Path) -> None:
    """Negative control of the weight check: a source tensor amer has no place for is named, not dropped."""
    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no place for weight 'model.layers.0.mlp.extra.weight'"):
        from_transformers(tmp_path)


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    """Llama 3.1/3.2's frequency-dependent RoPE scaling (a pretraining context of 16 makes it act within T = 12);
    negative control: plain RoPE on the same weights no longer matches."""
    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf = build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", rope_parameters=rope, **LLAMA)
    assert_same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.attention.rope_scale_factor == 8.0 and cfg.attention.rope_scale_original == 16
    for blk in model.blocks[::2]:
        blk.mixer.cfg_rope = dataclasses.replace(cfg.attention, rope_scale_factor=None)
        blk.mixer.init_buffers()
    with torch.no_grad():
        diff = (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()
    assert diff > 100 * ATOL


def test_sliding_window_matters(tmp_path: Path) -> None:
    """Negative control: the same Mistral without its window (T > window) no longer matches."""
    hf = build_source(tmp_path, "MistralForCausalLM", "MistralConfig", sliding_window=3, **LLAMA)
    model, cfg = from_transformers(tmp_path)
    model.blocks[0].mixer.window = None
    model.blocks[2].mixer.window = None
    with torch.no_grad():
        diff = (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()
    assert diff > 100 * ATOL


@pytest.mark.parametrize("what,edit,message", [
    ("class", {"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel: no converter"),
    ("rope", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}}, "rope_type='yarn'"),
    ("activation", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("missing size", {"hidden_size": None}, "config.json holds a value amer cannot read"),
    ("absent size", {"num_attention_heads": "__drop__"}, "config.json lacks 'num_attention_heads'"),
    ("mixed windows", {"layer_types": ["full_attention", "sliding_attention", "full_attention"],
                       "sliding_window": 4}, "mix full and sliding-window"),
])
def test_unsupported_sources_fail_in_one_line(tmp_path: Path, what: str, edit: dict[str, Any], message: str) -> None:
    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    cfg = {k: v for k, v in cfg.items() if v != "__drop__"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as info:
        from_transformers(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_folder_and_bin_only(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such transformers model folder"):
        from_transformers(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="re-save it with safe_serialization"):
        from_transformers(tmp_path)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = build_source(tmp_path / "one", "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_function(hf, tmp_path / "sharded")


def word_tokenizer(path: Path) -> None:
    """A tiny word-level tokenizer.json (ids below VOCAB) in the source folder, as a hub checkpoint has."""
    import tokenizers as tk

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "in", "the", "beginning", "was", "word"])}
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def test_import_holds_one_copy_of_the_weights_at_its_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converted tensors become the model's parameters (assigned, not copied into a second model built
    beside them), so the conversion's peak of live tensor memory is about one copy of the weights.
    Negative control: copying into a freshly built model peaks at two."""
    from safetensors.torch import load_file

    import amer.interop as interop
    from amer.bench.harness import peak_tensor_bytes
    from amer.interop.source import Source
    from amer.model import HybridLM

    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", vocab_size=4096, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    # the source's tensors from memory, each read a fresh allocation: safetensors maps the file, which the
    # allocator profile would count as an allocation of the whole file per read
    weights = load_file(str(tmp_path / "model.safetensors"))
    read = Source.get

    def from_memory(self: Source, key: str, *, optional: bool = False) -> torch.Tensor | None:
        if key not in weights:
            return read(self, key, optional=optional)
        self._used.add(key)
        return weights[key].clone()

    monkeypatch.setattr(Source, "get", from_memory)
    held: list[Any] = []
    peak = peak_tensor_bytes(lambda: held.append(from_transformers(tmp_path)))
    model = held.pop()[0]
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > 10e6 and peak < 1.2 * size, (peak, size)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # each parameter owns its memory (safetensors refuses shared storage)

    def copy_into_a_built_model(cfg: Any, state: dict[str, torch.Tensor], arch: str) -> HybridLM:
        fresh = HybridLM(cfg)
        fresh.load_state_dict(state)
        return fresh

    monkeypatch.setattr(interop, "_load", copy_into_a_built_model)
    assert peak_tensor_bytes(lambda: held.append(from_transformers(tmp_path))) > 1.8 * size


def test_cli_import_writes_a_loadable_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from amer.cli import main
    from amer.hub import load_pretrained

    src = tmp_path / "src"
    hf = build_source(src, "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    word_tokenizer(src)
    assert main(["import", str(src), str(tmp_path / "out")]) == 0
    assert "imported LlamaForCausalLM" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    model, cfg = load_pretrained(tmp_path / "out")
    with torch.no_grad():
        diff = (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()
    assert diff <= ATOL
    # surgery from the command line: every second attention becomes a Mamba-2 block configured by --set
    argv = ["import", str(src), str(tmp_path / "hybrid"), "--pattern", "AEMEAE", "--set", "mamba.head_dim=16"]
    assert main(argv) == 0
    assert "pattern AEMEAE, 6 blocks, 5 kept, 1 fresh (L2:M0)" in capsys.readouterr().out
    hybrid, hcfg = load_pretrained(tmp_path / "hybrid")
    assert hcfg.pattern == "AEMEAE" and hcfg.mamba.head_dim == 16
    assert torch.equal(hybrid.blocks[0].mixer.qkv.weight, model.blocks[0].mixer.qkv.weight)
    # the curvature report reads the folder like a checkpoint: depth curvature across the new boundaries
    text = tmp_path / "text.txt"
    text.write_text("\n".join("in the beginning was the word " * 6 for _ in range(40)))
    assert main(["curvature", "--checkpoint", str(tmp_path / "hybrid"), "--data", str(text), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "16", "--n-bootstrap", "20", "--no-progress",
                 "--out", str(tmp_path / "curv")]) == 0
    report = json.loads((tmp_path / "curv" / "curvature.json").read_text())
    assert {"E->M", "M->E"} <= {b["type"] for b in report["result"]["boundaries"]}
    capsys.readouterr()
    assert main(argv[:-1] + ["mamba.head_dimm=16"]) == 2
    assert "did you mean 'head_dim'" in capsys.readouterr().err
    # an unsupported class: one line, exit code 2, nothing written
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "architectures": ["BertModel"]}))
    assert main(["import", str(src), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "cannot import BertModel" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_surgery_keeps_unchanged_blocks_and_initialises_the_rest(tmp_path: Path) -> None:
    """(AE)*4 -> every second attention becomes M: A, E blocks keep the imported weights, the Ms are what a fresh
    model of the new pattern gets from the seed; STP selection and the curvature report run on the result."""
    from amer import HybridLM
    from amer.analysis.curvature import evaluate
    from amer.interop.surgery import replace_pattern
    from amer.tap import resolve_selector

    build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", **{**LLAMA, "num_hidden_layers": 4})
    model, cfg = from_transformers(tmp_path)
    new, new_cfg, kept, fresh = replace_pattern(model, "AEMEAEME", seed=3, mamba={"head_dim": 16})
    assert fresh == ["L2:M0", "L6:M1"] and len(kept) == 6
    torch.manual_seed(3)
    reference = HybridLM(new_cfg)
    for i, new_blk in enumerate(new.blocks):
        want = (reference if f"L{i}:{new_blk.layer.name}" in fresh else model).blocks[i].state_dict()
        for name, t in new_blk.state_dict().items():
            assert torch.equal(t, want[name]), f"block {i} {name}"
    assert torch.equal(new.embed.weight, model.embed.weight) and torch.equal(new.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(new.blocks[2].norm.weight, model.blocks[2].norm.weight)  # the old A's norm is gone
    assert resolve_selector("M-1,A-1", new_cfg.parsed) == [5, 7]
    report = evaluate(new, [{"tokens": tokens(seed=s)} for s in range(2)], n_bootstrap=20, progress=False)
    assert {b["type"] for b in report["boundaries"]} >= {"E->M", "M->E", "A->E"}
    with pytest.raises(Exception, match="has 7 blocks but the model has 8"):
        replace_pattern(model, "AEMEAEM")


HYBRID = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8)


@pytest.mark.parametrize("tied", [False, True])
def test_bamba(tmp_path: Path, tied: bool) -> None:
    hf = build_source(tmp_path, "BambaForCausalLM", "BambaConfig", attn_layer_indices=[1], tie_word_embeddings=tied,
                      **HYBRID)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "MEAEMEME" and cfg.attention.rope_fraction == 0.5


@pytest.mark.parametrize("experts,top_k", [(4, 2), (4, 1), (0, 0)])
def test_granite_moe_hybrid(tmp_path: Path, experts: int, top_k: int) -> None:
    hf = build_source(tmp_path, "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
                      layer_types=["mamba", "attention", "mamba", "mamba"], num_local_experts=experts,
                      num_experts_per_tok=top_k, shared_intermediate_size=40, embedding_multiplier=1.7,
                      residual_multiplier=0.6, attention_multiplier=0.4, logits_scaling=0.5,
                      position_embedding_type="rope" if experts else None, **HYBRID)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "MEAEMEME" and (cfg.embed_scale, cfg.residual_scale, cfg.logit_scale) == (1.7, 0.6, 2.0)


def test_nemotron_h(tmp_path: Path) -> None:
    hf = build_source(tmp_path, "NemotronHForCausalLM", "NemotronHConfig", vocab_size=VOCAB, hidden_size=32,
                      intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp",
                                                     "linear_attention"],
                      mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "MEAEM" and cfg.moe.activation == "relu2" and cfg.attention.rope_fraction == 0.0
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["layers_block_type"][1] = "gated_delta"  # a layer type Nemotron-H does not have
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="layer type 'gated_delta'"):
        from_transformers(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_recurrent_gemma(tmp_path: Path, tied: bool) -> None:
    hf = build_source(tmp_path, "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", hidden_size=32,
                      intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                      attention_window_size=5, block_types=["recurrent", "recurrent", "attention"],
                      logits_soft_cap=3.0, tie_word_embeddings=tied)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "REREAERE" and cfg.attention.window == 5 and cfg.recurrent.bias


def test_model_options_train_decode_and_pack() -> None:
    """The model-level options imported checkpoints use (embedding, residual and logit multipliers, soft cap,
    (1 + w) norms) keep the contract: decoding equals the full forward, a packed document equals it alone,
    every parameter gets a gradient, and they do change the function (negative control)."""
    from amer import HybridLM, ModelConfig

    opts = dict(embed_scale=2.5, residual_scale=0.7, logit_scale=1.3, logit_softcap=2.0, norm_offset=1.0)
    base = dict(pattern="AEMR", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                mamba={"head_dim": 16, "chunk_size": 8}, moe={"n_experts": 4, "d_ff": 48})
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**base, **opts)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm.weight.add_(0.3 * torch.randn_like(blk.norm.weight))
    ids = tokens()
    with torch.no_grad():
        full = model(ids, taps=False).logits
        cache, steps = model.init_cache(B, T), []
        for t in range(T):
            out = model(ids[:, t:t + 1], taps=False, cache=cache)
            cache = out.cache
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
        assert full.abs().max() <= 2.0  # soft-capped
        packed = torch.cat([ids[1:, :5], ids[:1]], dim=1)  # a 5-token document, then the first row's document
        doc_ids = torch.tensor([[0] * 5 + [1] * T])
        got = model(packed, taps=False, doc_ids=doc_ids).logits[:, 5:]
        torch.testing.assert_close(got, full[:1], rtol=0, atol=1e-5)
    model.train()
    model(ids).logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.manual_seed(0)
    plain = HybridLM(ModelConfig(**base)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(ids, taps=False).logits - full).abs().max() > 0.1


def export_round_trip(model: Any, cfg: Any, out: Path) -> float:
    """amer -> transformers folder -> transformers model: the max logit difference (the folder's class checked by
    the caller)."""
    from amer.interop import export_transformers

    export_transformers(model, cfg, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        ref = model(tokens(), taps=False).logits
        assert ref.abs().max() > 0.05, "logits too small to compare"
        diff = (hf(input_ids=tokens(), use_cache=False).logits - ref).abs().max().item()
    print(f"{type(hf).__name__}: round trip {diff:.1e}")
    return diff


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("LlamaForCausalLM", "LlamaConfig", dict(attention_bias=True)),
    ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 8})),
    ("MistralForCausalLM", "MistralConfig", dict(sliding_window=4)),
    ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4)),
])
def test_export_round_trip_llama_style(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    build_source(tmp_path / "src", cls, cfg_cls, **LLAMA, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]


def test_export_round_trip_mamba2_and_fresh_models(tmp_path: Path) -> None:
    from amer import HybridLM, ModelConfig

    build_source(tmp_path / "src", "Mamba2ForCausalLM", "Mamba2Config", **MAMBA2)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "m") <= ATOL
    torch.manual_seed(0)  # a model trained in amer (here: initialised), dense and routed
    for name, moe in (("dense", {"n_experts": 1, "d_ff": 48}), ("moe", {"n_experts": 4, "top_k": 2, "d_ff": 48})):
        cfg = ModelConfig(pattern="(AE)*2", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                          attention={"n_heads": 4, "n_kv_heads": 2}, moe=moe)
        assert export_round_trip(HybridLM(cfg).eval(), cfg, tmp_path / name) <= ATOL


def test_export_refuses_what_the_classes_cannot_express(tmp_path: Path) -> None:
    from amer import HybridLM, ModelConfig
    from amer.errors import InputError
    from amer.interop import export_transformers

    for kw, message in ((dict(pattern="AEMR"), "pattern 'AEMR'"), (dict(pattern="(AE)*2", logit_softcap=5.0),
                                                                    "model.logit_softcap")):
        cfg = ModelConfig(d_model=32, vocab_size=VOCAB, max_seq_len=64, mamba={"head_dim": 16}, **kw)
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    cfg = ModelConfig(pattern="(AE)*1", d_model=32, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 1})
    with pytest.raises(InputError, match="did not export"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_peer_twin_refuses_different_functions(tmp_path: Path) -> None:
    """``amer bench peers`` times an imported twin only after its logits match; a twin that does not match
    (here: the transformers model changed after the import would have read it) is an error."""
    from amer.bench.peers import imported_twin
    from amer.errors import TrainingError

    hf = build_source(tmp_path, "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, **LLAMA)
    batch = {"tokens": tokens()}
    model, diff = imported_twin(hf, batch)
    assert diff <= ATOL and model.training
    original = hf.save_pretrained

    def save_then_perturb(path: Any, **kw: Any) -> None:
        original(path, **kw)
        with torch.no_grad():
            hf.lm_head.weight.add_(0.5)

    hf.save_pretrained = save_then_perturb
    with pytest.raises(TrainingError, match="differs from it by"):
        imported_twin(hf, batch)


@pytest.mark.parametrize("cls,cfg_cls,kw", [("LlamaForCausalLM", "LlamaConfig", LLAMA),
                                            ("Mamba2ForCausalLM", "Mamba2Config", MAMBA2)])
def test_greedy_decoding_matches_transformers_generate(tmp_path: Path, cls: str, cfg_cls: str,
                                                       kw: dict[str, Any]) -> None:
    """amer's decoding loop (amer.generate.decode, with its caches) continues a prompt exactly as transformers'
    greedy generate does."""
    from amer.generate import decode

    hf = build_source(tmp_path, cls, cfg_cls, **kw)
    model, _ = from_transformers(tmp_path)
    prompt = tokens()[:, :5]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)[:, 5:]
    got = decode(model, prompt.tolist(), 8, temperature=0.0)
    assert got == want.tolist()
