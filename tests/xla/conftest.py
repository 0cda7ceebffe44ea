"""The XLA lane: these tests run only where torch_xla imports (its own environment, ``PJRT_DEVICE=CPU``; see
``.ci/xla``). Elsewhere they are not collected at all, rather than reported as skipped."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")

from amer import xla  # noqa: E402  (after PJRT_DEVICE: torch_xla reads it when it starts)

collect_ignore_glob = [] if xla.available() else ["test_*.py"]
