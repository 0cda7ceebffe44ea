"""amer: hybrid attention / Mamba / MoE / recurrent language models with typed hidden-state taps
and Semantic Tube Prediction (STP)."""

from amer.config import AttentionConfig, ConfigError, MambaConfig, ModelConfig, MoEConfig, RecurrentConfig, STPConfig
from amer.model import HybridLM, ModelOutput
from amer.pattern import Family, LayerSpec, Pattern, PatternError, parse_pattern
from amer.tap import SelectorError, Tap, TapSet

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig", "ConfigError", "MambaConfig", "ModelConfig", "MoEConfig", "RecurrentConfig", "STPConfig",
    "HybridLM", "ModelOutput", "Family", "LayerSpec", "Pattern", "PatternError", "parse_pattern",
    "SelectorError", "Tap", "TapSet", "__version__",
]


def __getattr__(name: str):
    # lazy: these modules are written alongside and import torch-heavy pieces on demand
    if name in ("compute_stp_loss",):
        from amer import stp

        return getattr(stp, name)
    if name in ("load_checkpoint",):
        from amer import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'amer' has no attribute {name!r}")
