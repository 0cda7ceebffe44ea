"""Test-suite settings. Tests use tiny tensors, where intra-op threads cost more in synchronisation than
they gain (and make timings swing when the machine is shared); one thread keeps the suite fast and steady.

Each test starts with amer's loggers as a library caller finds them: a command run in an earlier test
configured them (``amer.logs.configure``) for its own process, which must not leak into the next test."""

import logging

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _unconfigured_amer_logging():
    yield
    root = logging.getLogger("amer")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)
    root.propagate = True
