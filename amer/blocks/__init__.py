"""Block families, one file per family: its config, mixer, initialisation, FLOP count and registry entry.

Importing this package registers the built-in families (A, M, E, R) in :mod:`amer.families`; a new
family is a new module here plus its import below.
"""

from amer.blocks import attention, mamba, moe, recurrent  # noqa: F401,E402  (registers A, M, E, R)
from amer.blocks.common import Block, Mixer, MixerOutput, RMSNorm, SwiGLU
from amer.blocks.doc_ids import DocIds

__all__ = ["Block", "DocIds", "Mixer", "MixerOutput", "RMSNorm", "SwiGLU"]
