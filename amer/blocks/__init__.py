"""Block families, one file per family: its config, mixer, initialisation, FLOP count and registry entry.

Importing this package registers the built-in families (A, M, E, R, S, C) in :mod:`amer.families`; a new
family is a new module here plus its import below.
"""

from amer.blocks import attention, mamba, mamba1, moe, recurrent, shortconv  # noqa: F401,E402  (registers the families)
from amer.blocks.common import Block, Mixer, MixerOutput, RMSNorm, SwiGLU
from amer.blocks.documents import Documents

__all__ = ["Block", "Documents", "Mixer", "MixerOutput", "RMSNorm", "SwiGLU"]
