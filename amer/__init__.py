"""amer: hybrid attention / Mamba / MoE / recurrent language models with typed hidden-state taps
and Semantic Tube Prediction (STP)."""

from amer.blocks.attention import AttentionConfig
from amer.blocks.mamba import MambaConfig
from amer.blocks.moe import MoEConfig
from amer.blocks.recurrent import RecurrentConfig
from amer.config import ConfigError, Dims, ModelConfig, STPConfig
from amer.errors import AmerError
from amer.families import Family, FamilySpec, get_family, register_family
from amer.model import HybridLM, ModelOutput
from amer.pattern import LayerSpec, Pattern, PatternError, parse_pattern
from amer.tap import SelectorError, Tap, TapSet

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig", "MambaConfig", "MoEConfig", "RecurrentConfig", "ConfigError", "Dims", "ModelConfig",
    "STPConfig", "AmerError", "Family", "FamilySpec", "get_family", "register_family", "HybridLM", "ModelOutput",
    "LayerSpec", "Pattern", "PatternError", "parse_pattern", "SelectorError", "Tap", "TapSet", "__version__",
    "compute_stp_loss", "load_checkpoint", "from_transformers",
]


def __getattr__(name: str):
    # lazy: the loss kernel and checkpoint reader are not needed to build a model
    if name == "compute_stp_loss":
        from amer.stp import compute_stp_loss

        return compute_stp_loss
    if name == "from_transformers":  # reads transformers checkpoints from disk (amer.interop)
        from amer.interop import from_transformers

        return from_transformers
    if name == "load_checkpoint":
        from amer.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'amer' has no attribute {name!r}")
