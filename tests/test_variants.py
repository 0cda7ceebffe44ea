"""Per-layer variants of a family: ``A.swa`` in the pattern, ``[model.attention.variants.swa]`` in the config.

A variant is its family's config with some values changed, so one model holds sliding-window beside full
attention (each with its own RoPE base) or a dense feed-forward beside MoE layers, while taps and selectors
still address every layer by family and index.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from amer import HybridLM, ModelConfig, parse_pattern
from amer.configio import from_dict, parse_toml, to_dict
from amer.errors import ConfigError, PatternError, SelectorError
from amer.tap import resolve_selector, tap_names

VARIANTS = {"attention": {"n_heads": 4, "variants": {"swa": {"window": 4, "rope_theta": 100.0}}},
            "moe": {"n_experts": 4, "d_ff": 32, "variants": {"dense": {"n_experts": 1, "d_ff": 48}}}}


def cfg(pattern: str = "(A.swa E A E.dense)*2", **over) -> ModelConfig:
    return ModelConfig(pattern=pattern, d_model=32, vocab_size=64, max_seq_len=64, **{**VARIANTS, **over})


@pytest.mark.parametrize("text, keys", [
    ("A.swa E A E.dense", ["A.swa", "E", "A", "E.dense"]),
    ("(A.swa E)*2 AE", ["A.swa", "E", "A.swa", "E", "A", "E"]),
    ("A.swaE@5", ["A.swa", "E", "A.swa", "E", "A.swa"]),  # a variant name ends at the next capital
    ("A.local E | A.x_y E", ["A.local", "E", "A.x_y", "E"]),
    ("A.swa2", None),  # a digit ends a variant name: here it is not a block (selectors index with it)
])
def test_variants_parse_and_the_canonical_form_round_trips(text: str, keys: list[str]) -> None:
    if keys is None:
        with pytest.raises(PatternError, match="unknown block '2'"):
            parse_pattern(text)
        return
    p = parse_pattern(text)
    assert [layer.key for layer in p.layers] == keys
    assert [layer.name for layer in p.layers][:2] == ["A0", "E0"]  # family indices count across variants
    assert parse_pattern(p.letters).layers == p.layers


@pytest.mark.parametrize("text, pos, words", [
    ("A.", 1, "needs a variant name"),
    ("AE.Dense", 3, "needs a variant name"),
    ("A.1x", 2, "needs a variant name"),
    ("A" + "." + "x" * 33, 2, "longer than 32"),
])
def test_bad_variant_syntax_is_a_positioned_error(text: str, pos: int, words: str) -> None:
    with pytest.raises(PatternError, match=words) as e:
        parse_pattern(text)
    assert e.value.position == pos


def test_each_layer_is_built_from_its_variant() -> None:
    model = HybridLM(cfg())
    got = [(b.layer.key, getattr(b.mixer, "window", None), getattr(b.mixer, "n_experts", None)) for b in model.blocks]
    assert got[:4] == [("A.swa", 4, None), ("E", None, 4), ("A", None, None), ("E.dense", None, 1)]
    swa, full = model.blocks[0].mixer, model.blocks[2].mixer
    assert not torch.equal(swa.inv_freq, full.inv_freq)  # each variant its own RoPE base
    assert model.blocks[3].mixer.router is None and model.blocks[1].mixer.router is not None
    out = model(torch.randint(0, 64, (2, 12)))
    assert out.logits.shape == (2, 12, 64)


def test_a_variant_changes_what_the_layer_computes() -> None:
    """Negative control: the same weights run as full attention instead of the window give other outputs."""
    torch.manual_seed(0)
    a = HybridLM(cfg())
    b = HybridLM(cfg(pattern="(A E A E.dense)*2"))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (1, 16))
    assert not torch.allclose(a(x).logits, b(x).logits, atol=1e-4)


def test_selectors_address_layers_by_family_and_by_variant() -> None:
    p = cfg().parsed
    names = tap_names(p)
    pick = lambda sel: [names[i] for i in resolve_selector(sel, p)]  # noqa: E731
    assert pick("A-1") == ["A3"] and pick("A.swa") == ["A0", "A2"] and pick("A.swa-1") == ["A2"]
    assert pick("E.dense0,E0") == ["E0", "E1"]
    with pytest.raises(SelectorError, match=r"no A\.local blocks \(variants of A: swa"):
        resolve_selector("A.local", p)
    with pytest.raises(SelectorError, match="unknown item"):
        resolve_selector("L.swa", p)


def test_config_round_trips_through_dicts_toml_and_replace() -> None:
    c = cfg()
    d = to_dict(c)
    assert d["attention"]["variants"] == {"swa": {"window": 4, "rope_theta": 100.0}}
    assert from_dict(ModelConfig, d) == c
    assert dataclasses.replace(c, d_model=48).family_config("E", "dense").d_ff == 48
    toml = parse_toml(b"""
pattern = "(A.swa E)*2"
d_model = 32
[attention]
n_heads = 4
[attention.variants.swa]
window = 8
rope_theta = 10000.0
""", "test", ConfigError)
    t = from_dict(ModelConfig, toml, where="model.")
    assert t.family_config("A", "swa").window == 8 and t.family_config("A").window is None


def test_a_variant_inherits_what_it_does_not_change() -> None:
    c = cfg(attention={"n_heads": 2, "head_dim": 8, "variants": {"swa": {"window": 4}}})
    assert (c.family_config("A", "swa").n_heads, c.family_config("A", "swa").head_dim) == (2, 8)


@pytest.mark.parametrize("over, words", [
    ({"pattern": "A.local E"}, r"A\.local \(layer 0\) names a variant of attention that is not defined"),
    ({"attention": {"variants": {"Swa": {}}}}, "must be lower case letters"),
    ({"attention": {"variants": {"swa": {"windw": 3}}}}, r"model\.attention\.variants\.swa\.windw'; did you mean"),
    ({"attention": {"variants": []}}, "must be a table of named variants"),
    ({"attention": {"variants": {"swa": 4}}}, r"variants\.swa must be a table"),
    ({"attention": {"variants": {"swa": {"variants": {}}}}}, "has no variants of its own"),
    ({"attention": {"variants": {"swa": {"n_heads": 3}}}}, "divisible|n_heads"),  # checked like the family
])
def test_bad_variants_are_one_line_errors(over: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**{"pattern": "A.swa E", "d_model": 32, **over})


def test_a_model_with_variants_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(1)
    model = HybridLM(cfg()).eval()
    model.save_pretrained(tmp_path / "m")
    back = HybridLM.from_pretrained(tmp_path / "m")
    assert back.cfg == model.cfg
    x = torch.randint(0, 64, (1, 9))
    assert torch.equal(back(x).logits, model(x).logits)


def test_norm_placement_per_model_family_and_variant() -> None:
    """pre: x + f(norm(x)); post: x + norm(f(x)) (OLMo 2); sandwich: x + norm2(f(norm1(x))) (Gemma 2/3)."""
    c = ModelConfig(pattern="G A E.pre A.sw E", d_model=32, vocab_size=64,
                    attention={"n_heads": 4, "norm_placement": "post",
                               "variants": {"sw": {"window": 4, "norm_placement": "sandwich"}}},
                    moe={"n_experts": 1, "norm_placement": "post", "variants": {"pre": {"norm_placement": "pre"}}})
    model = HybridLM(c)
    assert [(b.norm is not None, b.post_norm is not None) for b in model.blocks] == [
        (True, False), (False, True), (True, False), (True, True), (False, True)]
    assert from_dict(ModelConfig, to_dict(c)) == c
    with pytest.raises(ConfigError,
                       match=r"model\.attention\.norm_placement must be one of \['pre', 'post', 'sandwich'\]"):
        ModelConfig(pattern="AE", d_model=32, attention={"norm_placement": "middle"})


def test_post_norm_block_computes_x_plus_norm_of_the_update() -> None:
    torch.manual_seed(0)
    c = ModelConfig(pattern="E", d_model=16, vocab_size=32, norm_placement="post", moe={"n_experts": 1})
    blk = HybridLM(c).blocks[0]
    x = torch.randn(2, 5, 16)
    y, out = blk(x)
    want = x + blk.post_norm(blk.mixer(x).y)
    torch.testing.assert_close(y, want)
    # negative control: the pre-norm formula gives something else
    assert not torch.allclose(y, x + blk.mixer(blk.post_norm(x)).y, atol=1e-4)


def test_residual_options_weight_the_two_terms() -> None:
    """``residual_multiplier`` a, ``update_multiplier`` b and ``residual_normed`` (MiniMax): a * norm(x) +
    b * f(norm(x)), b on top of the model's residual-scale; per family and variant, round-tripped. The defaults
    compute exactly x + f(norm(x)) (bit for bit); negative control: the residual taken from x instead of norm(x)
    differs."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    plain = HybridLM(ModelConfig(pattern="AE", d_model=16, vocab_size=32, attention={"n_heads": 4})).blocks[0]
    assert torch.equal(plain(x)[0], x + plain.mixer(plain.norm(x)).y)
    c = ModelConfig(pattern="A E E.mm", d_model=16, vocab_size=32, residual_scale=0.7,
                    attention={"n_heads": 4, "residual_multiplier": 0.5, "update_multiplier": 2.0,
                               "residual_normed": True},
                    moe={"n_experts": 1, "variants": {"mm": {"residual_multiplier": 0.25}}})
    model = HybridLM(c)
    a, e, mm = model.blocks
    h = a.norm(x)
    torch.testing.assert_close(a(x)[0], 0.5 * h + (2.0 * 0.7) * a.mixer(h).y, rtol=0, atol=1e-6)
    torch.testing.assert_close(e(x)[0], x + 0.7 * e.mixer(e.norm(x)).y, rtol=0, atol=1e-6)
    torch.testing.assert_close(mm(x)[0], 0.25 * x + 0.7 * mm.mixer(mm.norm(x)).y, rtol=0, atol=1e-6)
    assert not torch.allclose(a(x)[0], 0.5 * x + (2.0 * 0.7) * a.mixer(h).y, atol=1e-3)
    assert from_dict(ModelConfig, to_dict(c)) == c
    with pytest.raises(ConfigError, match="residual_normed needs a norm before the mixer"):
        ModelConfig(pattern="A", d_model=16, attention={"norm_placement": "post", "residual_normed": True})
