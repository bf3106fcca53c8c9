"""Config sections every recipe shares (the stage schemas extend them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    """The ``train`` section: optimisation and the epoch loop's resume controls."""

    epochs: int = 2
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    resume: bool = True  # continue from the newest intact checkpoint of the run
    stop_after_epochs: int | None = None  # end this job early (time-sliced clusters); resume continues

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.epochs, train.batch_size and train.grad_accum must be >= 1")


@dataclass
class DeepSpeedSettings:
    config: str | None = None  # a ZeRO JSON file or name (deepspeed/zero2, deepspeed/zero3)
