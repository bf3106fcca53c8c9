"""The recipe skeleton every trainer uses (torchtune's interface: setup -> train -> save -> cleanup).

A recipe supplies the stage-specific hooks: ``setup`` (model, data, back-end), ``train_epoch``,
``validate`` (a score, higher is better, and the log row), ``write_weights`` /
``read_weights`` (its weights format) and ``finish`` (after the last epoch: plots, operating
points, export folders). The skeleton owns what every recipe needs the same way: the epoch loop,
``metrics.jsonl``, checkpoints (``last``/``previous``/``best``, verified, atomic) and exact
resume (weights, optimizer, scheduler, RNG and epoch; the data order is a function of seed and
epoch), ``train.stop_after_epochs`` for time-sliced jobs.
"""

from __future__ import annotations

import json
import math
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, TypeVar

import torch

from mammorg.config import load_config
from mammorg.io import MammorgError
from mammorg.training.backends import TorchBackend, barrier, broadcast, leave_distributed, world
from mammorg.training.checkpoint import CheckpointStore
from mammorg.training.settings import TrainSettings

T = TypeVar("T")


class EpochRecipe(ABC):
    """A recipe's run folder and ``train`` settings are given here; ``setup`` sets ``backend``."""

    backend: TorchBackend

    def __init__(self, run_dir: str | Path, train: TrainSettings):
        self.run_dir = Path(run_dir)
        self.epochs, self.stop_after = train.epochs, train.stop_after_epochs
        self.resume_enabled = train.resume
        self.rank, self.world = world()
        self.start_epoch, self.best = 0, -math.inf

    # ---- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Build data, model, optimizer and ``self.backend``."""

    @abstractmethod
    def train_epoch(self, epoch: int) -> float:
        """One pass over the training data; the mean loss (over ranks)."""

    @abstractmethod
    def validate(self, epoch: int, train_loss: float) -> tuple[float | None, dict[str, Any]]:
        """(score, higher is better; None: no validation data) and the fields of the log row."""

    @abstractmethod
    def write_weights(self, folder: Path) -> None:
        """Write the model's weights (every rank calls it; gather under ZeRO-3)."""

    def read_weights(self, folder: Path) -> None:
        """Read back what ``write_weights`` wrote (resume with a back-end that does not)."""

    def finish(self) -> None:
        """After the last epoch (also when a finished run is run again)."""

    def cleanup(self) -> None:
        """Release what ``setup`` acquired."""

    def result(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir)}

    # ---- skeleton ----------------------------------------------------------------------------
    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.run_dir, self.rank, barrier)

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            self.train()
            self.save()
        finally:
            self.cleanup()
            leave_distributed()
        return self.result()

    def train(self) -> None:
        self.resume()
        stop = self.epochs if self.stop_after is None else min(self.epochs, self.start_epoch + self.stop_after)
        for epoch in range(self.start_epoch, stop):
            loss = self.train_epoch(epoch)
            score, row = self.validate(epoch, loss)
            score = broadcast(score)
            value = -loss if score is None else score
            is_best = math.isfinite(value) and value > self.best
            self.best = max(self.best, value) if math.isfinite(value) else self.best
            self.log({"epoch": epoch, "train_loss": loss, **row})
            self.checkpoint(epoch, is_best)

    def save(self) -> None:
        self.finish()
        barrier()

    def log(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            fields = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if not isinstance(v, dict)
            )
            print(fields, file=sys.stderr)

    def client_state(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "best": self.best, "torch_rng": torch.get_rng_state()}

    def checkpoint(self, epoch: int, is_best: bool) -> None:
        """``last`` with the resumable state (``previous`` keeps the one before); ``best``."""
        client = self.client_state(epoch)

        def write_last(folder: Path) -> None:
            self.backend.save_state(folder, client)
            self.write_weights(folder)

        self.checkpoints.save("last", write_last, {"epoch": epoch})
        if is_best:
            self.checkpoints.save("best", self.write_weights, {"epoch": epoch})

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (``train.resume``)."""
        folder = self.checkpoints.resumable() if self.resume_enabled else None
        if folder is None:
            return
        if not self.backend.restores_weights:
            self.read_weights(folder)
        state = self.backend.load_state(folder)
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch, self.best = int(state["epoch"]) + 1, float(state["best"])
        if self.rank == 0:
            print(f"resumed from {folder} at epoch {self.start_epoch}", file=sys.stderr)


def trained_run(run_dir: str | Path, schema: type[T], what: str, which: str = "best") -> tuple[T, Path]:
    """(config, checkpoint folder to read weights from) of a trained run: ``which`` (``best``),
    else the newest intact checkpoint; one-line errors for a folder that is not such a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise MammorgError(f"{run_dir}: not a {what} run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", schema)
    folder = CheckpointStore(run_dir).weights(which)
    if folder is None:
        raise MammorgError(f"{run_dir}: no checkpoint (train first)")
    return cfg, folder
