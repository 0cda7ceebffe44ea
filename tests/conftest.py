"""Test-suite settings. Tests use tiny tensors, where intra-op threads cost more in synchronisation than
they gain (and make timings swing when the machine is shared); one thread keeps the suite fast and steady.

Each test starts with amer's loggers as a library caller finds them: a command run in an earlier test
configured them (``amer.logs.configure``) for its own process, which must not leak into the next test.

amer's cache (compile timings, inductor's compile cache) is a fresh folder per test session, inherited by the
commands tests start: ``--compile auto`` decides from first guesses there, never from this machine's history."""

import atexit
import logging
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ["AMER_CACHE_DIR"] = tempfile.mkdtemp(prefix="amer-test-cache-")
atexit.register(shutil.rmtree, os.environ["AMER_CACHE_DIR"], True)
os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _unconfigured_amer_logging():
    yield
    root = logging.getLogger("amer")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)
    root.propagate = True
