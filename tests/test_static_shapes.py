"""What the XLA lane relies on that every environment can check: the padded evaluation batch changes no figure,
and ``--device xla`` without torch_xla is a one-line input error."""

from __future__ import annotations

import pytest
import torch

from amer import HybridLM, ModelConfig, xla
from amer.config import STPConfig
from amer.data import ByteTokenizer, PackedDataset
from amer.errors import ConfigError
from amer.runtime import resolve_device
from amer.stp import STPPolicy
from amer.training.evaluate import evaluate


def _dataset() -> PackedDataset:
    docs = [f"document {i}: " + "word " * (3 + i % 11) for i in range(60)]
    return PackedDataset(docs, ByteTokenizer(), 16)


def test_padded_last_batch_has_one_shape_and_no_loss() -> None:
    ds = _dataset()
    plain, padded = list(ds.val_batches(7)), list(ds.val_batches(7, pad=True))
    assert plain[-1]["tokens"].shape[0] < 7  # the split does not divide evenly: the case under test
    assert all(b["tokens"].shape == (7, 16) for b in padded)
    last, short = padded[-1], plain[-1]["tokens"].shape[0]
    assert (last["targets"][short:] == -100).all() and (last["doc_ids"][short:] == -1).all()
    assert all(torch.equal(a["tokens"], b["tokens"][: a["tokens"].shape[0]]) for a, b in zip(plain, padded))


def test_evaluation_on_padded_batches_equals_unpadded() -> None:
    ds = _dataset()
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="AE", d_model=32, vocab_size=260, max_seq_len=16)
    model = HybridLM(cfg)
    policy = STPPolicy(STPConfig(enabled=True, layers="A-1,E-1", n_spans=4), model.pattern)
    a = evaluate(model, ds.val_batches(7), stp={"stp": policy})
    b = evaluate(model, ds.val_batches(7, pad=True), stp={"stp": policy})
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["stp/stp"] == pytest.approx(b["stp/stp"], rel=1e-6)


@pytest.mark.skipif(xla.available(), reason="checks the message shown where torch_xla is not installed")
def test_device_xla_without_torch_xla_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--device xla needs torch_xla.*see docs/scaling.md"):
        resolve_device("xla")


@pytest.mark.skipif(xla.available(), reason="checks the message shown where torch_xla is not installed")
def test_bench_xla_says_why_it_is_skipped() -> None:
    from amer.bench import BenchOptions, run_suite

    res = run_suite("xla", BenchOptions(quick=True))
    assert res.rows == [] and "torch_xla is not installed" in res.notes[0]
