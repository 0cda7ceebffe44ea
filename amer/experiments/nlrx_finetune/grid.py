"""What one invocation runs: its settings, the learning-rate pick, the grid of fine-tuning arms."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from amer.experiments.runs import GridSettings

__all__ = ["PROTOCOL", "INITS", "NTP", "SPAN", "TRIPLE", "Settings", "Arm", "pick_arms", "build_grid"]

# Bump when a code change alters what an arm measures: stale arm files are then refused.
PROTOCOL = 1
INITS = ("pretrained", "scratch")
NTP, SPAN, TRIPLE = "ntp", "span", "triple"  # an arm's STP form (ntp: lambda 0, no STP term)


@dataclass
class Settings(GridSettings):
    """Everything one invocation needs; :meth:`fingerprint` holds what changes an arm's result."""

    train_file: str
    test_file: str
    data_name: str  # what the reports call the data
    models: list[tuple[str, str]]  # (name, pattern); with --init: one entry, the checkpoint's pattern
    lambdas: list[float]  # span-form STP weights (0 = NTP)
    fractions: list[str]
    seeds: list[int]
    triple_lambda: float | None = 0.02  # the bridge arm to `amer experiment nlrx` (triple form); None: none
    inits: list[str] = field(default_factory=lambda: list(INITS))
    init: str | None = None  # a checkpoint to fine-tune instead of pretraining one per model
    d_model: int = 128
    pretrain_epochs: float = 1.0
    pretrain_seq_len: int = 256
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 100
    pretrain_max_bytes: int | None = None  # per corpus; None = all of it
    pretrain_every: int = 200  # steps between resumable pretraining checkpoints
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    lr: float | None = None  # a fixed fine-tuning lr: skips the pick
    epochs: float = 4.0
    batch_size: int = 16
    weight_decay: float = 0.0
    ntp_targets: str = "all"
    n_spans: int = 1  # span form: patches per example per step (the released code's random_span_times)
    triple_spans: int = 4  # triple form: triples per example per step (as in `amer experiment nlrx`)
    gate_margin: float = 0.1
    gate: bool = True  # False: the gate is measured and reported, never withholds the verdict
    init_sha: str | None = None
    chat_template: str = "auto"  # with --init: the folder's chat template where it has one, or "amer"
    regime: str = "cpu"  # the named configuration the defaults came from (cpu, paper)

    def fingerprint(self) -> dict[str, Any]:
        keys = ("d_model", "epochs", "batch_size", "weight_decay", "ntp_targets", "n_spans", "triple_spans",
                "eval_spans", "train_rows", "test_rows", "system_prompt", "max_new_tokens", "erank_tokens", "data_sha",
                "init_sha")
        # settings added later enter only when they differ from what earlier runs did: their arms stay valid
        later = {k: getattr(self, k) for k, default in (("dtype", "float32"), ("chat_template", "auto"))
                 if getattr(self, k) != default}
        return {"protocol": PROTOCOL, **self.pretrain_fingerprint(), **{k: getattr(self, k) for k in keys}, **later}

    def pretrain_fingerprint(self) -> dict[str, Any]:
        if self.init is not None:
            return {"init": self.init_sha}
        keys = ("d_model", "pretrain_epochs", "pretrain_seq_len", "pretrain_batch", "pretrain_lr", "pretrain_warmup",
                "pretrain_max_bytes")
        return {k: getattr(self, k) for k in keys}

    @property
    def top_fraction(self) -> str:
        return max(self.fractions, key=Fraction)


@dataclass(frozen=True)
class Arm:
    init: str  # "pretrained" | "scratch"
    model: str
    pattern: str
    form: str  # "ntp" | "span" | "triple"
    lam: float
    fraction: str
    seed: int
    lr: float

    @property
    def id(self) -> str:
        return (f"{self.init}_{self.model}_lr{self.lr:g}_{self.form}_lam{self.lam:g}_"
                f"f{self.fraction.replace('/', '-')}_s{self.seed}")

    @property
    def group(self) -> tuple[str, str, str, float, str]:
        """The arm without its seed (and lr, fixed per init and model): what means are taken over."""
        return self.init, self.model, self.form, self.lam, self.fraction


def pick_arms(s: Settings) -> list[Arm]:
    """The learning-rate pick: NTP on all the (top-fraction) data, the first seed, every candidate lr."""
    lrs = [s.lr] if s.lr is not None else s.lrs
    return [Arm(init, name, pattern, NTP, 0.0, s.top_fraction, s.seeds[0], lr)
            for init in s.inits for name, pattern in s.models for lr in lrs]


def build_grid(s: Settings, lrs: dict[tuple[str, str], float]) -> list[Arm]:
    """Seed-major (an interrupted grid already has whole seeds): per seed, init, model and fraction, NTP, the
    span-form lambdas, then the triple-form bridge arm. ``lrs[(init, model)]`` is the picked learning rate."""
    arms: list[Arm] = []
    for seed in s.seeds:
        for init in s.inits:
            for name, pattern in s.models:
                lr = lrs[(init, name)]
                for frac in s.fractions:
                    for lam in s.lambdas:
                        arms.append(Arm(init, name, pattern, NTP if lam == 0 else SPAN, lam, frac, seed, lr))
                    if s.triple_lambda:
                        arms.append(Arm(init, name, pattern, TRIPLE, s.triple_lambda, frac, seed, lr))
    return arms
