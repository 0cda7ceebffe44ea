"""What one invocation runs: its settings, the arms of the grid, each arm's model and STP selection, and
the nested per-seed training subsets."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from amer import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, RecurrentConfig
from amer.errors import ExperimentError
from amer.experiments.runs import GridSettings
from amer.tap import last_of_each_family

__all__ = ["TAPS", "NTP", "PROTOCOL", "Settings", "Arm", "build_grid", "model_config", "family_selector",
           "subset_rows"]

TAPS = ("final", "family")
NTP = "ntp"  # the taps label of lambda-0 arms: no STP term, so no selection
# Bump when a code change alters what an arm measures: stale arm files are then refused. 2: the seeded
# initialisation draws differently since each block family initialises its own mixer, so an older arm no
# longer shares its seed's initialisation with newer ones and the paired comparisons would be broken.
PROTOCOL = 2


def model_config(pattern: str, d_model: int, max_seq_len: int = 384) -> ModelConfig:
    """A small model for this task: 4 attention heads, Mamba-2 with 16-dim heads and state, 4 experts top-2."""
    if d_model % 16:
        raise ExperimentError(f"--d-model must be a multiple of 16 (attention and Mamba heads are 16 wide), "
                              f"got {d_model}")
    return ModelConfig(
        pattern=pattern, d_model=d_model, max_seq_len=max_seq_len,
        attention=AttentionConfig(n_heads=max(2, d_model // 16), n_kv_heads=max(1, d_model // 32)),
        mamba=MambaConfig(d_state=16, head_dim=16, expand=2, chunk_size=64),
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=2 * d_model),
        recurrent=RecurrentConfig(n_heads=2),
    )


def family_selector(cfg: ModelConfig) -> str:
    """The last block of each family present, in registry order: ``"A-1,M-1,E-1,R-1"``."""
    return last_of_each_family(cfg.parsed)


@dataclass
class Settings(GridSettings):
    """Everything one invocation needs. Fields in :meth:`fingerprint` change results; the rest only pick arms."""

    data_dir: str
    models: list[tuple[str, str]]  # (name, pattern)
    lambdas: list[float]  # the sweep, run at the largest fraction
    taps: list[str]
    fractions: list[str]  # "1", "1/4", "1/16"
    seeds: list[int]
    lambdas_small: list[float] | None = None  # lambdas at the smaller fractions; None = the whole sweep
    d_model: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    n_spans: int = 4

    def fingerprint(self) -> dict[str, Any]:
        keys = ("d_model", "steps", "batch_size", "lr", "warmup_steps", "weight_decay", "n_spans", "eval_spans",
                "train_rows", "test_rows", "system_prompt", "max_new_tokens", "erank_tokens", "data_sha")
        return {"protocol": PROTOCOL, **{k: getattr(self, k) for k in keys}}


@dataclass(frozen=True)
class Arm:
    model: str
    pattern: str
    lam: float
    taps: str  # "final" | "family" | "ntp" (lambda 0)
    fraction: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}_lam{self.lam:g}_{self.taps}_f{self.fraction.replace('/', '-')}_s{self.seed}"

    @property
    def group(self) -> tuple[str, float, str, str]:
        """The arm without its seed: what means and stds are taken over."""
        return self.model, self.lam, self.taps, self.fraction


def build_grid(s: Settings) -> list[Arm]:
    """Every arm, seed-major so an interrupted grid already has complete seeds: per seed, per model,
    per fraction, NTP first then each (lambda, taps). Lambda 0 is one arm (taps are irrelevant).

    The whole lambda sweep runs at the largest fraction (what the Figure-4b check reads); the smaller
    fractions run ``lambdas_small`` (the data-efficiency check needs NTP and the candidate lambda),
    which keeps the default grid inside its time budget.
    """
    arms: list[Arm] = []
    top = max(s.fractions, key=Fraction)
    for seed in s.seeds:
        for name, pattern in s.models:
            for frac in s.fractions:
                lams = s.lambdas if frac == top or s.lambdas_small is None else s.lambdas_small
                for lam in lams:
                    for taps in ([NTP] if lam == 0 else s.taps):
                        arms.append(Arm(name, pattern, lam, taps, frac, seed))
    return arms


def subset_rows(n_total: int, fraction: str, seed: int) -> list[int]:
    """The first ``fraction`` of a per-seed permutation: nested subsets, shared by every arm of the seed."""
    n = max(1, round(Fraction(fraction) * n_total))
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(10_000 + seed))
    return sorted(perm[:n].tolist())
