"""Test-suite settings. Tests use tiny tensors, where intra-op threads cost more in synchronisation than
they gain (and make timings swing when the machine is shared); one thread keeps the suite fast and steady."""

import torch

torch.set_num_threads(1)
