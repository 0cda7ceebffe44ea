"""Training: one step (:mod:`.step`), one evaluation (:mod:`.evaluate`), the loop (:mod:`.loop`), the
optimizer and schedule (:mod:`.optim`), the run directory and its checkpoints (:mod:`.run`), logging."""

from amer.training.evaluate import evaluate
from amer.training.optim import lr_at, make_optimizer
from amer.training.step import StepOutput, TrainStep

__all__ = ["TrainStep", "StepOutput", "evaluate", "lr_at", "make_optimizer", "train"]


def __getattr__(name: str):
    if name == "train":  # the loop pulls in data loading; the step and evaluation do not need it
        from amer.training.loop import train

        return train
    raise AttributeError(f"module 'amer.training' has no attribute {name!r}")
