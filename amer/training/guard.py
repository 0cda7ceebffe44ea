"""Non-finite losses: which part went wrong, what to change, and when a run has to stop.

A step whose loss or gradient is non-finite is skipped (nothing applied), and so is a checkpoint whose
validation loss is non-finite. Too many in a row stop the run; a run that skipped most of its steps ends
with an error rather than exit code 0, because what it saved is not the run that was asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from amer.checkpoint import list_checkpoints
from amer.errors import TrainingError

__all__ = ["BadSteps", "aux_loss_settings", "cause_of"]


def _finite(x: Any) -> bool:
    return bool(torch.isfinite(x).all()) if torch.is_tensor(x) else math.isfinite(float(x))


def aux_loss_settings(model: torch.nn.Module) -> dict[str, str]:
    """Each auxiliary loss the model's blocks can return, with the setting that weights it (the mixers say)."""
    return {name: flag for m in model.modules() for name, flag in getattr(m, "aux_losses", {}).items()}


def cause_of(res: Any, aux_settings: Mapping[str, str] | None = None) -> str:
    """What made a skipped step non-finite, and the setting that addresses it (no '--lr' advice for an
    STP or auxiliary term, whose weight is the thing to change). ``aux_settings``: each auxiliary loss's
    weighting setting, from :func:`aux_loss_settings`."""
    if res.skipped_reason == "non-finite gradient":
        return "the gradient overflowed; lower --lr or --grad-clip, or use --dtype float32"
    parts = res.loss
    settings = aux_settings or {}
    if not _finite(parts.ce):
        return "the cross-entropy is non-finite; lower --lr or use --dtype float32"
    if not _finite(parts.aux):
        bad = [k for k, v in parts.aux_parts.items() if not _finite(v)] or sorted(parts.aux_parts)
        flags = [settings[k] for k in bad if k in settings]
        named = ", ".join(bad) or "an auxiliary loss"
        return f"the auxiliary loss {named} is non-finite" + (f"; lower {' / '.join(flags)}" if flags else "")
    if not _finite(parts.stp):
        return "the STP loss is non-finite; lower --lr or use --dtype float32"
    weights = " or ".join(dict.fromkeys(settings.values()))
    return ("the weighted sum of finite losses overflowed; lower --stp.weight "
            f"(STP coefficient {parts.coeff:g})" + (f" or {weights}" if weights else ""))


class BadSteps:
    """Counts skipped steps and failed validations; raises :class:`TrainingError` when the run must stop."""

    def __init__(self, limit: int, run_dir: Path) -> None:
        self.limit, self.run_dir = limit, run_dir
        self.in_a_row = 0
        self.skipped = 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, cause: str, *, train_step: bool = True) -> None:
        self.in_a_row += 1
        self.skipped += train_step
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} consecutive non-finite steps at step {step}: stopping; {cause} "
                                f"(last good checkpoint: {self._last()})")

    def finish(self, attempted: int, final_val_ok: bool) -> None:
        """After the last step: most steps skipped, or no valid final checkpoint, is a failed run."""
        if attempted and 2 * self.skipped > attempted:
            raise TrainingError(f"{self.skipped} of {attempted} steps were skipped as non-finite: the run did not "
                                f"train as asked (last good checkpoint: {self._last()}); lower --lr or check the "
                                "loss settings")
        if not final_val_ok:
            raise TrainingError(f"the final validation loss is non-finite, so no final checkpoint was written "
                                f"(last good checkpoint: {self._last()})")

    def _last(self) -> str:
        good = list_checkpoints(self.run_dir)
        return str(good[-1]) if good else "none"
