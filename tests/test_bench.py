"""Smoke tests of ``amer bench``: every suite runs in --quick mode and reports the promised table and JSON.

No timing is asserted (the machine is shared); what is asserted is what a user reads: the rows, their
columns, their relations (ratios against the baseline, one figure per sequence length and family), the
soundness of the two measuring instruments (interleaving and the peak-memory reader), the structural FLOP
count (against hand-written per-family formulas), and one-line errors for bad input. The last tests pin
the hand-written backward passes that the benchmark's profiling led to (fused RMSNorm, causal conv) to
exact gradients.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from amer import AttentionConfig, ModelConfig, MoEConfig, RecurrentConfig, bench
from amer.bench.workloads import family_config
from amer.cli import main as cli_main
from amer.families import letters

QUICK = ["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0"]


def run_quick(tmp_path, capsys, suite: str) -> tuple[dict, str]:
    out = tmp_path / f"{suite}.json"
    assert cli_main(["bench", suite, *QUICK, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["options"]["quick"] is True
    assert {"cpu", "cores", "torch", "date"} <= set(payload["machine"])
    return payload["suites"][suite], text


def test_blocks_suite(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    res, text = run_quick(tmp_path, capsys, "blocks")
    assert torch.get_num_threads() == threads  # --threads does not leak out of an in-process call
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {*letters(), "tiny"}  # one stack per registered family
    for fam in letters():
        assert set(rows[fam]["pattern"]) == {fam}  # single-family stacks
    assert rows["tiny"]["pattern"] == ModelConfig.from_preset("tiny").pattern
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["ms"] > 0
        assert math.isclose(r["tokens_per_s"], 2 * 32 / (r["ms"] / 1e3), rel_tol=1e-9)
    assert "== blocks ==" in text and "tokens_per_s" in text


def test_stp_suite_reports_ratio_per_span_count(tmp_path, capsys) -> None:
    res, _ = run_quick(tmp_path, capsys, "stp")
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["off", "n_spans=1", "n_spans=4", "n_spans=16"]
    assert rows["off"]["ratio"] == 1.0
    for n in (1, 4, 16):
        assert rows[f"n_spans={n}"]["ratio"] > 0
    assert any("A-1,M-1,E-1,R-1" in note for note in res["notes"])


def test_taps_suite_measures_memory_of_both_variants(tmp_path, capsys) -> None:
    res, _ = run_quick(tmp_path, capsys, "taps")
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"taps=True", "taps=False", "taps=True, held", "taps=True, held, logits"}
    assert rows["taps=False"]["extra_MB"] == 0 and rows["taps=False"]["time_ratio"] == 1.0
    for r in rows.values():
        assert r["peak_MB"] > 0
    # taps only reference states autograd saves anyway: recording every block costs not one byte at the peak,
    # as long as the step releases the output before backward (as the training loop does)
    assert rows["taps=True"]["extra_MB"] == 0
    assert rows["taps=True, held, logits"]["extra_MB"] > 0  # the instrument sees a held output that costs memory


def test_scaling_suite_covers_every_family_and_length(tmp_path, capsys) -> None:
    res, _ = run_quick(tmp_path, capsys, "scaling")
    train = [r for r in res["rows"] if r["name"].endswith("train")]
    decode = [r for r in res["rows"] if r["name"].endswith("decode")]
    assert {(r["family"], r["T"]) for r in train} == {(f, t) for f in letters() for t in (16, 32, 64)}
    assert {(r["family"], r["T"]) for r in decode} == {(f, t) for f in letters() for t in (8, 16, 32)}
    assert all(r["tokens_per_s"] > 0 and r["peak_MB"] > 0 for r in train)
    assert all(r["ms_per_token"] > 0 for r in decode)


def test_flops_suite_relates_step_to_matmul(tmp_path, capsys) -> None:
    res, _ = run_quick(tmp_path, capsys, "flops")
    rows = res["rows"]
    step, mm, gemm = rows[0], rows[-2], rows[-1]
    assert [r["name"] for r in rows[1:-2]] == [f"{f}{f} fwd+bwd" for f in letters()]
    assert mm["fraction_of_matmul"] == 1.0
    expected = bench.training_flops(ModelConfig.from_preset("tiny"), 2, 32)["total"]
    assert step["GFLOP"] == pytest.approx(expected / 1e9)
    assert 0 < step["fraction_of_matmul"] and step["GFLOP_per_s"] > 0
    # the profiled GEMMs do the step's matmul work: the structural count, give or take what it leaves out
    # (the embedding's one-hot-free lookup, flash attention's recomputation, routers and gates)
    assert gemm["name"] == "tiny step, its GEMM ops alone"
    assert 0.5 < gemm["GFLOP"] / step["GFLOP"] < 2.0 and gemm["GFLOP_per_s"] > 0


def test_op_profile_splits_gemm_time_from_the_rest() -> None:
    from amer.bench.opprofile import op_profile

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    x = torch.randn(1 << 16)

    def fn() -> None:
        torch.mm(a, b)
        torch.bmm(a[None], b[None])
        x.exp()

    prof = op_profile(fn, calls=2)
    assert prof.gemm_flops == 2 * (2 * 64 * 32 * 16)  # per call: the mm and the bmm, nothing from exp
    assert 0 < prof.gemm_s < prof.total_s and 0 < prof.gemm_share < 1
    assert "aten::exp" in [name for name, _ in prof.top]
    assert "GEMMs" in prof.describe()


@pytest.mark.slow
def test_plan_and_construction_suites(tmp_path, capsys) -> None:
    """Each layout runs in its own processes (torchrun for two ranks) and reports the prediction beside the
    measurement; construction reports every rank."""
    res, text = run_quick(tmp_path, capsys, "plan")
    assert [r["layout"] for r in res["rows"]] == ["one process", "one process, checkpointing blocks", "dp 2 (FSDP2)"]
    assert all(r["measured_MB"] > 0 and r["predicted_MB"] > 0 for r in res["rows"]) and "predicted_MB" in text
    res, _ = run_quick(tmp_path, capsys, "construction")
    assert [(r["layout"], r["rank"]) for r in res["rows"]][:3] == [("one process", 0), ("pp 2", 0), ("pp 2", 1)]
    assert all(r["holds_MB"] > 0 for r in res["rows"])


def test_peers_suite_runs_or_says_why_not(tmp_path, capsys) -> None:
    res, _ = run_quick(tmp_path, capsys, "peers")
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert res["rows"] == [] and any("transformers" in n for n in res["notes"])
        return
    names = {r["name"] for r in res["rows"]}
    assert {"jamba-like", "all-M", "A+E", "G+E", "all-S", "C+E"} <= names
    for r in res["rows"]:
        if "skipped" not in r:
            assert r["amer_params"] > 0 and r["hf_params"] > 0 and r["speedup"] > 0 and r["documents_speedup"] > 0
    imported = {r["name"]: r for r in res["rows"] if r.get("same_weights")}
    # the exactly importable pairs run the same weights
    assert set(imported) - {"all-S/mambapy"} == {"all-M", "A+E", "all-S", "C+E"}
    for r in imported.values():
        assert r["logits_max_diff"] <= 1e-4 and r["amer_params"] == r["hf_params"]
    gdn = next(r for r in res["rows"] if r["name"] == "G+E")  # matched dimensions: the same parameter count
    assert gdn["peer"] == "Qwen3NextForCausalLM" and gdn["amer_params"] == gdn["hf_params"]


# ----------------------------------------------------------------------------------------------
# command line


@pytest.mark.parametrize("argv, needle", [
    (["blokcs"], "did you mean 'blocks'"),
    (["blocks", "--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
    (["blocks", "--threads", "0"], "--threads must be an integer in [1, 4096], got 0"),
    (["blocks", "--out", "/nonexistent-dir/x.json"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys) -> None:
    assert cli_main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_cli_routes_bench(capsys) -> None:
    assert cli_main(["bench", "nope"]) == 2
    assert "unknown benchmark suite 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the instruments


def test_interleave_alternates_and_aligns_rounds() -> None:
    calls: list[str] = []
    times = bench.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times["a"]) == len(times["b"]) == 4
    assert bench.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_peak_tensor_bytes_sees_live_tensors_only() -> None:
    n = 1 << 20  # 4 MiB of fp32

    def two_live_one_temporary() -> None:
        a = torch.ones(n)
        b = torch.ones(n)
        del a
        c = torch.ones(n)  # a's memory is free again: the peak is two tensors, not three
        del b, c

    peak = bench.peak_tensor_bytes(two_live_one_temporary)
    assert 2 * 4 * n <= peak < 2 * 4 * n + 65536


def test_training_flops_is_six_n_per_token_for_dense_matmuls() -> None:
    """For a pattern without attention or SSD terms, FLOPs = 6 x (matmul weights used per token) x tokens,
    counted here independently from the model's own parameter shapes."""
    from amer.model import HybridLM

    cfg = ModelConfig(pattern="RE", d_model=16, vocab_size=40, moe=MoEConfig(n_experts=4, top_k=2, d_ff=24),
                      recurrent=RecurrentConfig(n_heads=2))
    model = HybridLM(cfg)
    B, T = 3, 5
    used = 0
    for name, p in model.named_parameters():
        if name.endswith("w_gate_up") or name.endswith("w_down"):
            used += p.numel() * cfg.moe.top_k // cfg.moe.n_experts  # a token visits top_k of the experts
        elif name.endswith(("in_proj.weight", "out_proj.weight", "router.weight", "gate_weight")):
            used += p.numel()
        elif name == "embed.weight":  # tied: used once, as the LM head
            used += p.numel()
    flops = bench.training_flops(cfg, B, T)
    assert flops["total"] == pytest.approx(6 * used * B * T)
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))


def test_training_flops_attention_counts_the_causal_half() -> None:
    cfg = ModelConfig(pattern="A", d_model=16, vocab_size=40, attention=AttentionConfig(n_heads=2, n_kv_heads=1))
    T = 9
    flops = bench.training_flops(cfg, 1, T)
    hd = 8
    # QK^T and AV: 2 matmuls x 2 FLOPs x heads x hd x (sum over queries of keys seen = T(T+1)/2), x3 training
    assert flops["A/attention"] == pytest.approx(3 * 2 * 2 * 2 * hd * T * (T + 1) / 2)


def _hand_written_flops(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Per-family matmul formulas written from the configs alone, not from the modules, so that this
    count and the mixers' own are independent."""
    T, D = seq_len, cfg.d_model
    macs: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        macs[key] = macs.get(key, 0.0) + value

    for layer in cfg.parsed.layers:
        fam = str(layer.family)
        if fam == "A":
            a = cfg.attention
            hd = a.head_dim or D // a.n_heads
            add("A/proj", T * (D * (a.n_heads + 2 * a.n_kv_heads) * hd + a.n_heads * hd * D))
            add("A/attention", 2 * a.n_heads * hd * T * (T + 1) / 2)
        elif fam == "M":
            m = cfg.mamba
            d_inner = m.expand * D
            H, P, N, G = d_inner // m.head_dim, m.head_dim, m.d_state, m.n_groups
            conv_dim = d_inner + 2 * G * N
            add("M/proj", T * (D * (d_inner + conv_dim + H) + d_inner * D))
            L = min(m.chunk_size, T)
            c = math.ceil(T / L)
            add("M/ssd", c * L * (G * L * N + H * L * P + 2 * H * P * N) + H * c * c * P * N)
        elif fam == "E":
            e = cfg.moe
            f = e.d_ff or 2 * D
            add("E/router", T * D * e.n_experts)
            add("E/experts", T * e.top_k * 3 * D * f)
            if e.shared_expert:
                add("E/shared", T * 3 * D * (e.d_ff_shared or f))
        else:
            assert fam == "R"
            r = cfg.recurrent
            W = r.lru_width or D
            bw = W // r.n_heads
            add("R/proj", T * (D * 2 * W + W * D))
            add("R/gates", T * W * 2 * bw)
    add("lm_head", T * D * cfg.vocab_size)
    flops = {k: 2.0 * 3.0 * v * batch for k, v in macs.items()}
    flops["total"] = sum(flops.values())
    return flops


@pytest.mark.parametrize("B, T", [(8, 256), (2, 32), (1, 100)])
def test_structural_flops_equal_the_hand_written_formulas(B: int, T: int) -> None:
    cfg = ModelConfig.from_preset("small")
    flops = bench.training_flops(cfg, B, T)
    assert flops == _hand_written_flops(cfg, B, T)
    assert list(flops) == list(_hand_written_flops(cfg, B, T))  # same terms, in the same order


def test_structural_flops_cover_every_term_of_the_optional_parts() -> None:
    """Shared expert, explicit head and LRU widths, B/C groups, a chunk that does not divide T."""
    cfg = family_config(ModelConfig.from_preset("small"), "AEMR",
                        attention={"n_heads": 6, "n_kv_heads": 3, "head_dim": 16},
                        mamba={"d_state": 32, "head_dim": 48, "n_groups": 2, "chunk_size": 48},
                        moe={"n_experts": 4, "top_k": 1, "d_ff": 96, "shared_expert": True, "d_ff_shared": 64},
                        recurrent={"lru_width": 256, "n_heads": 8})
    assert bench.training_flops(cfg, 4, 200) == _hand_written_flops(cfg, 4, 200)


def test_a_patterns_flops_are_the_sum_of_its_blocks() -> None:
    small = ModelConfig.from_preset("small")
    B, T = 3, 96
    whole = bench.training_flops(small, B, T)
    lm_head = whole["lm_head"]
    singles = {}
    for layer in small.parsed.layers:
        one = bench.training_flops(family_config(small, str(layer.family)), B, T)
        assert one["lm_head"] == lm_head
        for k, v in one.items():
            if k not in ("lm_head", "total"):
                assert k.startswith(f"{layer.family}/")
                singles[k] = singles.get(k, 0.0) + v
    assert {k: v for k, v in whole.items() if k not in ("lm_head", "total")} == pytest.approx(singles, rel=1e-12)
    assert whole["total"] == pytest.approx(sum(singles.values()) + lm_head, rel=1e-12)
    for pattern in ("(AE)*2M", "MRA"):
        cfg = family_config(small, pattern)
        by_block = [bench.training_flops(family_config(small, str(layer.family)), B, T)["total"] - lm_head
                    for layer in cfg.parsed.layers]
        assert bench.training_flops(cfg, B, T)["total"] == pytest.approx(sum(by_block) + lm_head, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# exact gradients of the hand-written kernels the profiling led to


def test_fused_rms_norm_gradients() -> None:
    from amer.ops.fused import rms_norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), F.rms_norm(x, (6,), w, 1e-5))
    torch.testing.assert_close(rms_norm(x, w, 1e-5, gate=z), F.rms_norm(x * F.silu(z), (6,), w, 1e-5))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, z: rms_norm(x, w, 1e-5, gate=z), (x, w, z))


@pytest.mark.parametrize("T, K", [(7, 4), (2, 4), (5, 1)])
def test_causal_conv_matches_conv1d_with_gradients(T: int, K: int) -> None:
    from amer.ops.conv import causal_conv1d

    torch.manual_seed(0)
    C = 3
    x = torch.randn(2, T + 2, C, dtype=torch.float64)[:, 1:-1].requires_grad_()  # a strided view, as from a split
    w = torch.randn(C, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w.unsqueeze(1), b, groups=C).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, w, b)[0], ref)
    assert torch.autograd.gradcheck(lambda x, w, b: causal_conv1d(x, w, b)[0], (x, w, b))


def test_tune_malloc_applies_once_and_reports_it() -> None:
    """On glibc Linux the allocator tuning the training CLI applies is accepted (and repeat calls are no-ops)."""
    import sys

    from amer.runtime import tune_malloc

    if not sys.platform.startswith("linux"):
        assert tune_malloc() is False
        return
    assert tune_malloc() is True
    assert tune_malloc() is True


@pytest.mark.parametrize("bias, documents", [(True, False), (False, True)])
def test_compiled_causal_conv_runs_the_opaque_op_with_eager_results(bias: bool, documents: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under compilation the training-path conv is one opaque op per direction (torch's opcheck passes for both);
    outputs and gradients equal the eager node's, document masks and a missing bias included. Negative control: the
    eager call never reaches the op, and the compiled graph holds it."""
    import amer.ops.conv as conv
    from amer.ops.conv import causal_conv1d

    torch.manual_seed(0)
    x = torch.randn(2, 9, 5, dtype=torch.float64)[:, :, 1:].requires_grad_()  # a strided view, as from a split
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1]]) if documents else None
    torch.library.opcheck(conv._conv_op, (x, w, b, pos))
    g0 = torch.randn(2, 9, 4, dtype=torch.float64)
    torch.library.opcheck(conv._conv_op_backward, (g0, x.detach(), w.detach(), pos))
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn(2, 9, 4, dtype=torch.float64)

    def grads(fn):
        y = fn(x, w, b, pos)
        return [y.detach(), *torch.autograd.grad(y, inputs, g)]

    targets: list[object] = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    calls = []
    monkeypatch.setattr(conv, "_conv_op", lambda *a, _op=conv._conv_op: (calls.append(1), _op(*a))[1])
    eager = grads(lambda *a: causal_conv1d(*a[:3], position=a[3])[0])
    assert calls == []
    torch._dynamo.reset()
    compiled = grads(torch.compile(lambda *a: causal_conv1d(*a[:3], position=a[3])[0], backend=backend, fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.ops.amer.causal_conv_shift.default in targets and calls
    monkeypatch.undo()
    assert torch.autograd.gradcheck(lambda *t: conv._conv_op(*t[:2], t[2] if bias else None, pos),
                                    (x, w, b if bias else torch.zeros(4, dtype=torch.float64)))
