"""The decode suite runs (quick sizes): amer's greedy decoding against transformers' generate() on the same
imported weights, the continuations equal."""

from __future__ import annotations

import pytest

from amer.bench import BenchOptions, run_suite


@pytest.mark.slow
def test_decode_suite_compares_equal_continuations() -> None:
    pytest.importorskip("transformers")
    res = run_suite("decode", BenchOptions(repeats=1, warmup=0, quick=True))
    assert {(r["peer"], r["batch"]) for r in res.rows} == {(p, b) for p in ("Mamba2ForCausalLM", "MixtralForCausalLM")
                                                           for b in (1, 2)}
    assert all(r["amer_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in res.rows), res.rows
    assert all(r["token_agreement"] == 1.0 for r in res.rows if r["batch"] == 1), res.rows  # same weights, same tokens
