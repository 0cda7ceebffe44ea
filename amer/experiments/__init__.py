"""Experiments built from amer's pieces (data, model, objective, STP), run by ``amer experiment NAME``.

Each experiment is a package of this one (the library: data, grid, runs, report) plus its command line,
``amer/cli/experiment_<name>.py`` with ``command(argv) -> int``, which ``amer experiment <name>`` calls.
They live outside the library proper because they make claims about results, not just provide
machinery: each writes its measurements and a plain statement of what they show.

- :mod:`amer.experiments.nlrx`: the STP paper's headline NL-RX-SYNTH experiment at CPU scale, from scratch.
- :mod:`amer.experiments.nlrx_finetune` (``amer experiment nlrx-finetune``): the same claim where the paper makes
  it, fine-tuning pretrained models with the released code's span form of STP.

A name with ``-`` lives in the package (and ``amer/cli/experiment_<name>.py``) spelled with ``_``.
"""

from __future__ import annotations

EXPERIMENTS = ("nlrx", "nlrx-finetune")

__all__ = ["EXPERIMENTS"]
