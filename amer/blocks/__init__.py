"""Block families, one file per mixer. ``mixer_class(family)`` imports the family's module on demand,
which registers it in ``common.MIXERS``."""

from amer.blocks.common import MIXERS, Block, MixerOutput, RMSNorm, SwiGLU, mixer_class

__all__ = ["MIXERS", "Block", "MixerOutput", "RMSNorm", "SwiGLU", "mixer_class"]
