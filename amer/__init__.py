"""amer: hybrid attention / Mamba / MoE / recurrent language models with typed hidden-state taps
and Semantic Tube Prediction (STP)."""

# The block families register themselves in amer.families when amer.blocks is imported; importing it first
# means the registry is complete whenever any part of amer runs (the registry never imports its members).
import amer.blocks  # noqa: F401  (registers the built-in families)
import amer.hub  # noqa: F401  (gives HybridLM.from_pretrained / save_pretrained their implementation)
from amer.blocks.attention import AttentionConfig
from amer.blocks.mamba import MambaConfig
from amer.blocks.moe import MoEConfig
from amer.blocks.recurrent import RecurrentConfig
from amer.config import ConfigError, Dims, ModelConfig, STPConfig
from amer.errors import AmerError
from amer.families import Family, FamilySpec, get_family, register_family
from amer.model import HybridLM, ModelOutput
from amer.pattern import LayerSpec, Pattern, PatternError, parse_pattern
from amer.stp import compute_stp_loss
from amer.tap import SelectorError, Tap, TapSet
from amer.version import __version__

__all__ = [
    "AttentionConfig", "MambaConfig", "MoEConfig", "RecurrentConfig", "ConfigError", "Dims", "ModelConfig",
    "STPConfig", "AmerError", "Family", "FamilySpec", "get_family", "register_family", "HybridLM", "ModelOutput",
    "LayerSpec", "Pattern", "PatternError", "parse_pattern", "SelectorError", "Tap", "TapSet", "__version__",
    "compute_stp_loss", "load_checkpoint", "from_transformers",
]


def __getattr__(name: str):
    # lazy: reading training checkpoints and transformers folders is not needed to build a model
    if name == "from_transformers":
        from amer.interop import from_transformers

        return from_transformers
    if name == "load_checkpoint":
        from amer.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'amer' has no attribute {name!r}")
