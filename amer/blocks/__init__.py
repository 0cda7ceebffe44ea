"""Block families, one file per family: its config, mixer, initialisation, FLOP count and registry entry.

Importing this package registers the built-in families (A, M, E, R, S, C) in :mod:`amer.families`; a new
family is a new module here plus its import below.
"""

from amer.blocks import attention, mamba, moe, recurrent  # noqa: F401,E402  (registers A, M, E, R)
from amer.blocks.common import Block, Mixer, MixerOutput, RMSNorm, SwiGLU
from amer.blocks.documents import Documents

__all__ = ["Block", "Documents", "Mixer", "MixerOutput", "RMSNorm", "SwiGLU"]

# after the first four, so the registry (and every listing) keeps the order A, M, E, R, S, C
from amer.blocks import mamba1, shortconv  # noqa: E402,F401  (registers S, C)
