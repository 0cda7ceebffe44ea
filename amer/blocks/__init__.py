"""Block families, one file per family: its config, mixer, initialisation, FLOP count and registry entry.

Importing this package registers the built-in families in :mod:`amer.families`; a new family is a new module
here plus its import below. Registration order is the order every listing shows (the original four first),
so the family imports are not sorted.
"""

# isort: off
from amer.blocks import attention, mamba, moe, recurrent  # noqa: F401  (A, M, E, R)
from amer.blocks import gated_deltanet, mamba1, shortconv  # noqa: F401  (G, S, C)
from amer.blocks import mla, lightning  # noqa: F401  (D, N)
from amer.blocks import zamba  # noqa: F401  (H)
# isort: on
from amer.blocks.common import Block, Mixer, MixerOutput, RMSNorm, SwiGLU
from amer.blocks.doc_ids import DocIds
from amer.blocks.parallel import parallel_layer, residual_layer
from amer.blocks.shared import SharedUse

__all__ = ["Block", "DocIds", "Mixer", "MixerOutput", "RMSNorm", "SharedUse", "SwiGLU", "parallel_layer",
           "residual_layer"]
