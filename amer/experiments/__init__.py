"""Experiments built from amer's pieces (data, model, objective, STP), run by ``amer experiment NAME``.

Each experiment is a package of this one (the library: data, grid, runs, report) plus its command line,
``amer/cli/experiment_<name>.py`` with ``command(argv) -> int``, which ``amer experiment <name>`` calls.
They live outside the library proper because they make claims about results, not just provide
machinery: each writes its measurements and a plain statement of what they show.

- :mod:`amer.experiments.nlrx`: the STP paper's headline NL-RX-SYNTH experiment at CPU scale.
"""

from __future__ import annotations

EXPERIMENTS = ("nlrx",)

__all__ = ["EXPERIMENTS"]
