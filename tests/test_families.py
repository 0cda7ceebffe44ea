"""A fifth block family defined here alone works everywhere amer reads the family registry.

The toy family ``W`` is a gated causal depthwise convolution with a decoding cache (the last
``kernel - 1`` inputs). Registering it, and nothing else, must make it parse, build, train, decode,
be selectable by STP, show in ``amer patterns``, get its own ``--model.dwconv.*`` flags, survive a
config round trip, report FLOPs and appear in the curvature report; and it must meet the same mixer
contract as the built-in families. Once unregistered, every one of those readers rejects the letter,
which shows the successes come from the registry and not from a hard-coded list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import test_documents as documents
import test_mixer_contract as contract
import torch
from torch import Tensor, nn

from amer import HybridLM, ModelConfig, STPConfig, parse_pattern
from amer.blocks.attention import AttentionConfig, AttentionMixer
from amer.blocks.common import Mixer, MixerOutput
from amer.config import ConfigError, Dims, check, from_dict, opt, to_dict
from amer.errors import InputError, PatternError
from amer.families import Family, FamilySpec, families, get_family, letters, register_family, unregister_family
from amer.generate import generate
from amer.objective import total_loss
from amer.pattern import LayerSpec
from amer.stp import STPPolicy

VOCAB = 64


@dataclass(frozen=True)
class DWConvConfig:
    """Gated causal depthwise convolution (the toy W family)."""

    kernel: int = opt(3, "toy W family: causal depthwise convolution width")
    gate: bool = opt(True, "toy W family: multiply the convolution by a sigmoid gate of the input")

    def __post_init__(self) -> None:
        check(self.kernel >= 1, f"dwconv.kernel must be >= 1, got {self.kernel}")


class DWConvCache(NamedTuple):
    window: Tensor  # (B, kernel - 1, D) the last convolution inputs


class DWConvMixer(Mixer):
    """y = out_proj(causal_depthwise_conv(u) * sigmoid(g)), [u | g] = in_proj(x)."""

    def __init__(self, cfg: DWConvConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.kernel, self.gated = cfg.kernel, cfg.gate
        D = dims.d_model
        self.in_proj = nn.Linear(D, 2 * D if cfg.gate else D, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(D, cfg.kernel))
        self.out_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(self.kernel)
        self.conv_weight.uniform_(-bound, bound)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)

    def flops(self, seq_len: int) -> dict[str, float]:
        return {"proj": self.linear_flops(seq_len), "conv": float(seq_len * self.dims.d_model * self.kernel)}

    def init_cache(self, batch_size: int, max_len: int, *, device: Any = None, dtype: Any = None) -> DWConvCache:
        device = self.conv_weight.device if device is None else device
        dtype = self.conv_weight.dtype if dtype is None else dtype
        return DWConvCache(torch.zeros(batch_size, self.kernel - 1, self.dims.d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor, cache: DWConvCache | None = None, doc_ids: Any = None) -> MixerOutput:
        B, T, D = x.shape
        if self.gated:
            u, g = self.in_proj(x).chunk(2, dim=-1)
        else:
            u, g = self.in_proj(x), None
        past = u.new_zeros(B, self.kernel - 1, D) if cache is None else cache.window.to(u.dtype)
        seq = torch.cat([past, u], dim=1)  # (B, kernel - 1 + T, D)
        windows = seq.unfold(1, self.kernel, 1)  # (B, T, D, kernel): taps t - kernel + 1 .. t
        if doc_ids is not None:  # a tap reaching back past the document's first token reads zero
            back = torch.arange(self.kernel - 1, -1, -1, device=x.device)  # steps back of each tap
            windows = windows * (doc_ids.position[:, :, None, None] >= back).to(windows.dtype)
        h = (windows * self.conv_weight).sum(-1)  # (B, T, D)
        if g is not None:
            h = h * torch.sigmoid(g)
        new = None if cache is None else DWConvCache(seq[:, seq.shape[1] - (self.kernel - 1):])
        return MixerOutput(self.out_proj(h), new)


TOY = FamilySpec(letter="W", name="dwconv", colour="#8c564b", config_key="dwconv", config=DWConvConfig,
                 mixer=DWConvMixer, summary="toy gated causal depthwise convolution")


@pytest.fixture
def toy() -> Any:
    register_family(TOY)
    try:
        yield TOY
    finally:
        unregister_family("W")


def toy_model(pattern: str = "AWMW", seed: int = 0, **overrides: Any) -> HybridLM:
    cfg = dict(pattern=pattern, d_model=32, vocab_size=VOCAB, max_seq_len=64,
               attention={"n_heads": 4, "n_kv_heads": 2},
               mamba={"d_state": 8, "head_dim": 16, "chunk_size": 8}, dwconv={"kernel": 3})
    cfg.update(overrides)
    torch.manual_seed(seed)
    return HybridLM(ModelConfig(**cfg))


def tokens(b: int = 2, t: int = 16, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# the registry


def test_registry_lists_and_types_the_toy(toy: FamilySpec) -> None:
    assert families()[-1] is toy and {"A", "M", "E", "R"} < set(letters())  # listed after the built-ins
    assert get_family("W") is toy
    assert Family("W") == "W" and Family("W").spec is toy and Family("W").long_name == "dwconv"
    assert list(Family.all())[-1] == "W"


def test_registry_refuses_taken_and_reserved_letters(toy: FamilySpec) -> None:
    with pytest.raises(InputError, match=r"family letter 'A' is already registered to attention"):
        register_family(FamilySpec(letter="A", name="clash", colour="#000000", config_key="clash",
                                   config=DWConvConfig, mixer=DWConvMixer))
    with pytest.raises(InputError, match=r"family letter 'W' is already registered to dwconv"):
        register_family(FamilySpec(letter="W", name="other", colour="#000000", config_key="dwconv",
                                   config=AttentionConfig, mixer=AttentionMixer))
    with pytest.raises(InputError, match=r"config_key 'attention' is already used by attention"):
        register_family(FamilySpec(letter="Q", name="clash", colour="#000000", config_key="attention",
                                   config=DWConvConfig, mixer=DWConvMixer))
    # a different class that merely shares the built-in mixer's name is not a reload of it
    impostor = type("AttentionMixer", (DWConvMixer,), {})
    with pytest.raises(InputError, match=r"family letter 'A' is already registered to attention"):
        register_family(FamilySpec(letter="A", name="attention", colour="#000000", config_key="mine",
                                   config=DWConvConfig, mixer=impostor))
    # 'L' selects absolute layers (L7), so a family there would make selectors ambiguous
    with pytest.raises(InputError, match=r"family letter 'L' is reserved"):
        FamilySpec(letter="L", name="layers", colour="#000000", config_key="layers", config=DWConvConfig,
                   mixer=DWConvMixer)
    with pytest.raises(InputError, match="one upper-case ASCII letter"):
        FamilySpec(letter="d", name="lower", colour="#000000", config_key="lower", config=DWConvConfig,
                   mixer=DWConvMixer)
    # the refusals left the registry as it was
    assert get_family("A").mixer is AttentionMixer and get_family("W") is toy
    with pytest.raises(InputError, match="unknown block family 'Q'"):
        get_family("Q")


def test_unregistered_letter_is_rejected_everywhere() -> None:
    """Without the registration each reader refuses W: what the other tests show is the registry's doing."""
    assert "W" not in [s.letter for s in families()]
    with pytest.raises(PatternError, match=r"'W'"):
        parse_pattern("AWMW")
    with pytest.raises(ConfigError, match="unknown model setting 'dwconv'"):
        ModelConfig(pattern="AM", dwconv={"kernel": 3})
    with pytest.raises(ConfigError, match=r"stp\.family_weights key 'W'"):
        STPConfig(family_weights={"W": 1.0})
    from amer.cli.train import build_parser

    assert "--model.dwconv.kernel" not in build_parser().format_help()


# ------------------------------------------------------------------------------------------------
# the mixer contract


CLAUSES = (*contract.CONTRACT, *documents.DOCUMENT_CONTRACT)


@pytest.mark.parametrize("clause", CLAUSES, ids=[c.__name__ for c in CLAUSES])
def test_toy_meets_the_mixer_contract(toy: FamilySpec, clause: Any) -> None:
    clause("W")


def test_toy_flops_by_hand(toy: FamilySpec) -> None:
    model = toy_model()
    mixer = model.blocks[1].mixer
    assert isinstance(mixer, DWConvMixer)
    D, k, T = 32, 3, 24
    # in_proj D -> 2D and out_proj D -> D per token; the convolution k multiply-adds per channel and token
    assert mixer.flops(T) == {"proj": float(T * (D * 2 * D + D * D)), "conv": float(T * D * k)}


# ------------------------------------------------------------------------------------------------
# everywhere the registry is read


def test_parses(toy: FamilySpec) -> None:
    pat = parse_pattern("AWMW")
    assert pat.letters == "AWMW"
    assert [(layer.family, layer.family_index) for layer in pat.layers] == [("A", 0), ("W", 0), ("M", 0), ("W", 1)]
    assert pat.count("W") == 2 and [layer.name for layer in pat.of_family("W")] == ["W0", "W1"]
    assert parse_pattern("(AW)*2M@7").letters == "AWAWMAW"


def test_builds_and_trains_one_step(toy: FamilySpec) -> None:
    from amer.training.step import TrainStep

    model = toy_model().train()
    assert [type(b.mixer).__name__ for b in model.blocks] == ["AttentionMixer", "DWConvMixer", "MambaMixer",
                                                              "DWConvMixer"]
    assert model.blocks[1].mixer.kernel == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_ = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = STPPolicy(STPConfig(enabled=True, layers="W", weight=0.1), model.pattern)
    x = tokens()
    step = TrainStep(model, opt_, policy, grad_clip=1.0)
    out = step([{"tokens": x, "targets": x.roll(-1, 1)}], step=0)
    assert out.applied and torch.isfinite(out.loss.total)
    assert set(out.loss.per_tap) == {"W0", "W1"} and out.loss.stp > 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    toy_params = {n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "blocks.3."))}
    assert toy_params and toy_params <= moved


def test_cached_generation_equals_greedy_rerun(toy: FamilySpec) -> None:
    model = toy_model(init_std=0.2).eval()  # spread logits: greedy argmax without near-ties
    prompt, n_new = tokens(t=6), 6
    got = generate(model, prompt, n_new, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq, taps=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_stp_selects_the_toy_tap(toy: FamilySpec) -> None:
    model = toy_model().train()
    policy = STPPolicy(STPConfig(enabled=True, layers="W-1", weight=1.0), model.pattern)
    assert policy.names == ["W1"]
    x = tokens()
    out = model(x)
    parts = total_loss(policy, out, x.roll(-1, 1), step=0)
    assert set(parts.per_tap) == {"W1"}
    d1, final = out.taps.select("W-1")[0], out.taps.final
    assert d1.layer == 3 and d1.family == "W"
    g_d1, g_final = torch.autograd.grad(parts.stp, [d1.hidden, final.hidden], allow_unused=True)
    assert g_d1 is not None and g_d1.abs().sum() > 0
    assert g_final is None  # the term reaches the selected tap only, not the stream after it
    # per-family STP weights key on the new letter as on the built-in ones
    weighted = STPPolicy(STPConfig(enabled=True, layers="A,W", family_weights={"W": 0.5}), model.pattern)
    assert dict(zip(weighted.names, weighted.tap_weights)) == {"A0": 1.0, "W0": 0.5, "W1": 0.5}


def test_amer_patterns_lists_the_toy(toy: FamilySpec, capsys: pytest.CaptureFixture[str]) -> None:
    from amer.cli import main

    assert main(["patterns", "AWMW"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "/".join(letters()) in lines[0].split() and letters().endswith("W")
    (row,) = [ln for ln in lines if ln.split() and ln.split()[0] == "AWMW"]
    counts = "/".join(str("AWMW".count(letter)) for letter in letters())  # one column per family, registry order
    assert row.split()[1:3] == ["4", counts] and counts.endswith("/2")
    (listing,) = [ln for ln in lines if ln.split()[:1] == ["W"]]
    assert listing.split()[:3] == ["W", "dwconv", "[model.dwconv]"] and toy.summary in listing


def test_train_flags_come_from_the_toy_config(toy: FamilySpec) -> None:
    from amer.cli.train import build_parser, resolve_config

    parser = build_parser()
    help_text = parser.format_help()
    assert "--model.dwconv.kernel" in help_text and "--model.dwconv.gate" in help_text
    assert "causal depthwise convolution width" in help_text
    args = vars(parser.parse_args(["--model.dwconv.kernel", "5", "--no-model.dwconv.gate"]))
    assert args["model.dwconv.kernel"] == 5 and args["model.dwconv.gate"] is False
    cfg, _ = resolve_config(["--preset", "tiny", "--pattern", "AWMW", "--model.dwconv.kernel", "5"])
    assert cfg.model.pattern == "AWMW" and cfg.model.dwconv == DWConvConfig(kernel=5, gate=True)
    with pytest.raises(ConfigError, match=r"dwconv\.kernel must be >= 1, got 0"):
        resolve_config(["--preset", "tiny", "--pattern", "AWMW", "--model.dwconv.kernel", "0"])


def test_config_round_trip(toy: FamilySpec) -> None:
    cfg = ModelConfig(pattern="AWMW", d_model=32, dwconv={"kernel": 5, "gate": False})
    assert cfg.family_config("W") == DWConvConfig(kernel=5, gate=False) and cfg.dwconv is cfg.family_config("W")
    data = to_dict(cfg)
    assert data["dwconv"] == {"kernel": 5, "gate": False}
    back = from_dict(ModelConfig, json.loads(json.dumps(data)))  # what a checkpoint's JSON gives back
    assert to_dict(back) == data and back.family_config("W") == cfg.family_config("W")
    with pytest.raises(ConfigError, match=r"unknown key 'dwconv\.kernal'; did you mean 'kernel'\?"):
        from_dict(ModelConfig, {"pattern": "AWMW", "dwconv": {"kernal": 3}})


def test_curvature_report_shows_the_toy(toy: FamilySpec, tmp_path: Path) -> None:
    from amer.analysis.curvature import evaluate
    from amer.report.curvature import write_report

    model = toy_model()
    batches = [{"tokens": tokens(seed=s)} for s in range(2)]
    res = evaluate(model, batches, strides=(1,), n_bootstrap=20, seed=0, progress=False)
    assert res["pattern"] == "AWMW"
    assert [layer["tap"] for layer in res["layers"]] == ["embed", "A0", "W0", "M0", "W1", "final"]
    assert res["families"]["W"]["name"] == "dwconv" and res["families"]["W"]["blocks"] == ["W0", "W1"]
    assert {"A->W", "W->M", "M->W", "W->final"} <= set(res["boundary_types"])
    paths = write_report({"config": {"data": "synthetic"}, "result": res}, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["result"]["families"]["W"]["blocks"] == ["W0", "W1"]
    assert "dwconv" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
