"""Shared blocks ``A:z``: the grammar, one set of parameters stored and counted once, gradients summed over every use,
one tap and one decoding cache per use, packed documents, initialisation as one unit. Each mechanism is checked
against the same model with the shared block written out as independent copies (same weights), with a negative
control where the test could pass by accident.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_mixer_contract as contract
import torch
from test_documents import check_model_packed_equals_alone
from test_mixer_contract import VOCAB, D

from amer import HybridLM, ModelConfig
from amer.blocks import SharedUse
from amer.errors import PatternError
from amer.model import unit_seed
from amer.pattern import parse_pattern

ATOL = 1e-5
SMALL = {"attention": contract.SMALL["A"], "mamba": contract.SMALL["M"], "moe": contract.SMALL["E"]}
PATTERN = "A:z E M A:z E [A:z M] E:f A E:f"
COPIES = "A E M A E [A M] E A E"  # the same stack, every use its own block


def model(pattern: str = PATTERN, seed: int = 1, **kw: Any) -> HybridLM:
    cfg = ModelConfig(pattern=pattern, d_model=D, vocab_size=VOCAB, max_seq_len=64, init_std=0.1, **{**SMALL, **kw})
    return HybridLM(cfg, seed=seed)


def ids(T: int = 20, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def as_copies(shared: HybridLM) -> HybridLM:
    """The model with each use of a shared block an independent block holding the shared weights."""
    copies = model(COPIES)
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("shared.")}
    for i, blk in enumerate(shared.blocks):
        if isinstance(blk, SharedUse):
            for k, v in blk.shared_block.state_dict().items():
                if k.startswith("norm.") and blk.layer.branch:  # a later branch has no norm of its own
                    continue
                state[f"blocks.{i}.{k}"] = v
    copies.load_state_dict(state)
    return copies


def test_share_names_parse_round_trip_and_fail_positioned() -> None:
    p = parse_pattern(PATTERN)
    assert [(s.name, s.share) for s in p.layers[:4]] == [("A0", "z"), ("E0", None), ("M0", None), ("A1", "z")]
    assert p.letters == "A:z EMA:z E[A:z M]E:f AE:f" and parse_pattern(p.letters).layers == p.layers
    for text, message, position in (("A:z E M:z", "':z' is A at position 0 and M", 6),
                                    ("A.swa:z A:z", "is A.swa at position 0 and A", 8),
                                    ("A: E", "needs a share name", 3), ("A:1", "needs a share name", 2),
                                    ("[A M:]", "needs a share name", 5)):
        with pytest.raises(PatternError, match=message) as info:
            parse_pattern(text)
        assert info.value.position == position and "\n" not in str(info.value), str(info.value)


def test_stored_and_counted_once() -> None:
    m = model()
    keys = list(m.state_dict())
    assert [k for k in keys if k.startswith("shared.z.")] == [
        "shared.z.norm.weight", "shared.z.mixer.qkv.weight", "shared.z.mixer.out_proj.weight"]
    assert not any(k.startswith(("blocks.0.", "blocks.3.", "blocks.5.", "blocks.7.", "blocks.9.")) for k in keys)
    assert all(isinstance(m.blocks[i], SharedUse) for i in (0, 3, 5, 7, 9))
    copies = model(COPIES)
    a = sum(p.numel() for p in m.shared["z"].parameters())
    e = sum(p.numel() for p in m.shared["f"].parameters())
    assert m.num_params() == copies.num_params() - 2 * a - e  # three uses of z, two of f: each stored once
    with torch.device("meta"):
        assert HybridLM(m.cfg).num_params() == m.num_params()


def test_same_function_as_copies_and_gradients_summed_over_uses() -> None:
    """Logits and taps equal the copies'; the shared gradient is the sum of the copies' gradients (negative
    control: any one copy's alone is not)."""
    m = model()
    copies = as_copies(m)
    x = ids()
    out, ref = m(x), copies(x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=ATOL)
    assert [t.name for t in out.taps] == [t.name for t in ref.taps]
    for a, b in zip(out.taps, ref.taps):
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=ATOL)
    probe = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(2))
    (out.logits * probe).sum().backward()
    (ref.logits * probe).sum().backward()
    g = m.shared["z"].mixer.qkv.weight.grad
    parts = [copies.blocks[i].mixer.qkv.weight.grad for i in (0, 3, 5)]
    torch.testing.assert_close(g, sum(parts), rtol=1e-5, atol=ATOL)
    assert all((g - part).abs().max() > 100 * ATOL for part in parts)
    torch.testing.assert_close(m.shared["f"].mixer.w_down.grad,
                               copies.blocks[7].mixer.w_down.grad + copies.blocks[9].mixer.w_down.grad,
                               rtol=1e-5, atol=ATOL)


def test_each_use_has_its_own_cache() -> None:
    """Token-by-token decoding equals the forward; negative control: two uses handed one cache slot diverge."""
    m = model().eval()
    x = ids()
    with torch.no_grad():
        want = m(x).logits
        cache = m.init_cache(2, 20)
        assert cache[0] is not cache[3] and cache[0].k.data_ptr() != cache[3].k.data_ptr()
        got = []
        for t in range(20):
            out = m(x[:, t:t + 1], cache=cache)
            cache = out.cache
            got.append(out.logits)
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=ATOL)
        cache = list(m(x[:, :10], cache=m.init_cache(2, 20)).cache)
        cache[3] = cache[0]
        assert (m(x[:, 10:], cache=cache).logits - want[:, 10:]).abs().max() > 100 * ATOL


def test_packed_documents_equal_alone() -> None:
    check_model_packed_equals_alone(model(), ids(24), ((0, 5, 8, 17), (0, 1, 16)))


def test_initialised_once_as_its_own_unit() -> None:
    """The shared block is the unit ``shared.<name>``, seeded by that name: a model whose first use sits elsewhere
    initialises it identically; its uses are no units."""
    m = model(seed=5)
    names = [u.name for u in m.init_units()]
    assert "shared.z" in names and "shared.f" in names and "blocks.0" not in names and "blocks.1" in names
    other = model("E M A:z E A:z", seed=5)
    torch.testing.assert_close(other.shared["z"].mixer.qkv.weight, m.shared["z"].mixer.qkv.weight, rtol=0, atol=0)
    assert unit_seed(5, "shared.z") != unit_seed(5, "blocks.0")


def test_pretrained_folder_round_trip(tmp_path: Any) -> None:
    """Saved and loaded (strict keys, one copy of the shared weights): the same logits, still one shared block."""
    m = model().eval()
    m.save_pretrained(tmp_path / "out")
    back = HybridLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, m(ids()).logits, rtol=0, atol=0)
    assert back.blocks[3].shared_block is back.shared["z"] and back.num_params() == m.num_params()


ZAMBA = {"zamba": contract.SMALL["H"], "mamba": contract.SMALL["M"]}


def test_per_use_parts_stay_with_each_use() -> None:
    """A mixer's ``per_use`` submodules (the H family's adapters, linear and Mamba-2) are held by each use, the rest
    once: keys, counts, units and gradients say so; the model equals one built of independent H blocks holding the
    same weights, its decoding equals its forward, and each use's parts matter (negative control: two uses' parts
    exchanged move the logits)."""
    shared = model("M H:z M H:z H:z", **ZAMBA)
    copies = model("M H M H H", **ZAMBA)
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("shared.") and ".parts." not in k}
    for i, blk in enumerate(shared.blocks):
        if isinstance(blk, SharedUse):
            state.update({f"blocks.{i}.mixer.{k}": v for k, v in blk.shared_block.mixer.state_dict().items()})
            state.update({f"blocks.{i}.mixer.{k}": v for k, v in blk.parts.state_dict().items()})
    copies.load_state_dict(state)
    uses = [b for b in shared.blocks if isinstance(b, SharedUse)]
    assert all(".parts." in k or not k.startswith("blocks.1.") for k in shared.state_dict())
    transformer = sum(p.numel() for p in shared.shared["z"].parameters())
    assert shared.num_params() == copies.num_params() - 2 * transformer
    assert {"blocks.1", "blocks.3", "blocks.4", "shared.z"} <= {u.name for u in shared.init_units()}
    x = ids()
    with torch.no_grad():
        want = copies(x).logits
        torch.testing.assert_close(shared(x).logits, want, rtol=0, atol=ATOL)
        cache, got = shared.init_cache(2, 20), []
        for t in range(20):
            out = shared(x[:, t:t + 1], cache=cache, taps=False)
            cache = out.cache
            got.append(out.logits)
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=ATOL)
        uses[0].parts, uses[2].parts = uses[2].parts, uses[0].parts
        assert (shared(x).logits - want).abs().max() > 100 * ATOL
        uses[0].parts, uses[2].parts = uses[2].parts, uses[0].parts
    shared(x).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.parameters())


def test_pipeline_split_refused_for_mixers_that_read_the_embedding() -> None:
    """Stages pass the stream only, so a model whose mixers read the embedding output is not cut (one line); the same
    cut without them is (control)."""
    from amer.errors import ConfigError
    from amer.training.pipeline import stage_layers

    with pytest.raises(ConfigError, match="read the embedding output"):
        stage_layers(model("M H:z | M H:z", **ZAMBA), 2)
    assert stage_layers(model("M A:z | M A:z"), 2) == [[0, 1], [2, 3]]
