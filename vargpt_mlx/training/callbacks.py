"""Typed progress callbacks of the training loop (the shape of mlx-lm's ``TrainingCallback`` in
``mlx_lm/tuner/callbacks.py``). No MLX import: the command line defines its callback before it
loads anything."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepInfo:
    step: int  # updates done (1-based after the update)
    iters: int
    loss: float
    metrics: dict[str, float]
    tokens_per_sec: float
    peak_memory_gb: float
    elapsed: float
    eta: float
    learning_rate: float


class TrainingCallback:
    """What ``trainer.train`` reports; override the events you want (each does nothing here)."""

    def on_step(self, info: StepInfo) -> None:
        """After every optimizer update."""

    def on_save(self, step: int) -> None:
        """After the checkpoint and the adapters of ``step`` are written."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After a validation pass at ``step`` (``metrics``: the task's evaluation)."""


__all__ = ["StepInfo", "TrainingCallback"]
