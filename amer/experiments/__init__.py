"""Experiments built from amer's pieces (data, model, objective, STP), run by ``amer experiment NAME``.

Each experiment is a package (or module) of this one exposing ``command(argv) -> int``, which raises
:class:`~amer.errors.AmerError` on bad input, and ``main(argv) -> int``, the same with errors turned into
one line and an exit code. They live outside the library proper because they make claims about results,
not just provide machinery: each writes its measurements and a plain statement of what they show.

- :mod:`amer.experiments.nlrx`: the STP paper's headline NL-RX-SYNTH experiment at CPU scale.
"""

from __future__ import annotations

EXPERIMENTS = ("nlrx",)

__all__ = ["EXPERIMENTS"]
