"""Recipe: ``mammorg stage1 train --config stage1/default [key=value ...]``.

Several GPUs (DDP): ``torchrun --nproc_per_node N -m mammorg stage1 train --config ...``; DeepSpeed
ZeRO 0-2 with ``deepspeed.config=deepspeed/zero2``.

setup (data, model, back-end) -> train (the skeleton's epoch loop: deterministic data order,
validation, ``last``/``best`` checkpoints, exact resume) -> save (operating points and plots
from the best checkpoint) -> cleanup.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mammorg.config import save_config
from mammorg.io import MammorgError, write_json_atomic
from mammorg.training.backends import init_distributed, make_backend, mean_over_ranks
from mammorg.training.checkpoint import load_tensors, save_tensors
from mammorg.training.optim import cosine_with_warmup
from mammorg.training.recipe import EpochRecipe
from stage1_classification.config import Stage1Config
from stage1_classification.crop_reader import crop_set, freeze_crop_reader, train_crop_reader
from stage1_classification.data import EpochSampler, ExamDataset, birads_class_weights, collate
from stage1_classification.inference import WEIGHTS, predict_dataset
from stage1_classification.metrics import stage1_metrics
from stage1_classification.model import MultiViewClassifier, create_model, stage1_loss
from stage1_classification.operating_points import FILENAME as OPERATING_POINTS_FILE
from stage1_classification.operating_points import OperatingPoints, fit_from_outputs
from stage1_classification.plots import confusion_pngs, learning_curve_png

CROP_READER_FILE = "crop_reader.json"  # the crop reader's phase: crops, loss, validation accuracy
CROPS_SKIPPED = "no box of a mass or a calcification in the training split: the crop reader trains with the main epochs"


def loader(ds: ExamDataset, cfg: Stage1Config, shuffle: bool, rank: int = 0, world: int = 1) -> DataLoader:
    """One loader for every epoch (``sampler.set_epoch`` before each): a deterministic order per
    (seed, epoch), an equal shard per rank, worker processes kept alive between epochs and a
    few batches prefetched, so the GPU is not left waiting for workers to start."""
    workers = cfg.data.num_workers
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        sampler=EpochSampler(len(ds), shuffle, cfg.seed, rank, world, ds),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def epoch_batches(dl: DataLoader, epoch: int) -> DataLoader:
    assert isinstance(dl.sampler, EpochSampler)
    dl.sampler.set_epoch(epoch)
    return dl


@torch.no_grad()
def validation_pass(model: MultiViewClassifier, dl: DataLoader, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Head outputs (logits, on the CPU) and the label batches of every exam of a loader."""
    model.eval()
    outputs, batches = [], []
    for batch in epoch_batches(dl, 0):
        out = model(batch["images"].to(device, non_blocking=True), batch["view_mask"].to(device))
        outputs.append({k: v.float().cpu() for k, v in out.items() if k != "tokens"})
        batches.append(batch)
    model.train()
    return outputs, batches


class Stage1Recipe(EpochRecipe):
    """The multi-view classifier's training (see the module docstring)."""

    def __init__(self, cfg: Stage1Config, plots: bool = True):
        super().__init__(cfg.run_dir, cfg.train)
        self.cfg, self.plots = cfg, plots

    def setup(self) -> None:
        cfg = self.cfg
        self.device = init_distributed(bool(cfg.deepspeed.config))
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir)
        torch.manual_seed(cfg.seed)
        self.train_ds = ExamDataset(
            cfg.data.cache_manifest,
            cfg.data.train_split,
            augment=True,
            seed=cfg.seed,
            folds=cfg.data.folds,
            fold=cfg.data.fold,
        )
        self.val_ds = ExamDataset(cfg.data.cache_manifest, cfg.data.val_split)
        if len(self.train_ds) == 0:
            raise MammorgError(f"{cfg.data.cache_manifest}: no exams in split '{cfg.data.train_split}'")
        self.train_loader = loader(self.train_ds, cfg, True, self.rank, self.world)
        self.val_loader = loader(self.val_ds, cfg, False) if len(self.val_ds) else None
        model = create_model(cfg.model).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.crop_epochs:
            self.read_crops_first(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        per_rank = math.ceil(len(self.train_ds) / self.world)
        steps = cfg.train.epochs * math.ceil(per_rank / cfg.train.batch_size / cfg.train.grad_accum)
        self.backend = make_backend(
            model,
            optimizer,
            cosine_with_warmup(optimizer, cfg.train.warmup_steps, steps),
            deepspeed_config=cfg.deepspeed.config,
            batch_size=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            clip=1.0,
            max_zero_stage=2,
        )
        self.birads_weights = (
            birads_class_weights(self.train_ds, cfg.train.class_weight_power).to(self.device)
            if cfg.train.class_weight_power
            else None
        )

    def read_crops_first(self, model: MultiViewClassifier) -> None:
        """The crop reader's own phase (``train.crop_epochs``), unless the run resumes from a
        checkpoint that holds its weights; then it is frozen for the main epochs. A training split
        without a box of a mass or a calcification has nothing to read: the phase is skipped and
        the reader trains with the main epochs instead of staying frozen at its random weights."""
        cfg = self.cfg
        if cfg.train.resume and self.checkpoints.resumable() is not None:
            trained = self.crop_reader_trained()
        else:
            plain = ExamDataset(cfg.data.cache_manifest, cfg.data.train_split, folds=cfg.data.folds, fold=cfg.data.fold)
            train = crop_set(model, plain, self.rank == 0)
            trained = len(train) > 0
            if trained:
                val = crop_set(model, self.val_ds, self.rank == 0) if len(self.val_ds) else None
                summary = train_crop_reader(
                    model, train, val, cfg.train.crop_epochs, cfg.train.crop_lr, cfg.seed, progress=self.rank == 0
                )
            else:
                summary = {"train_breasts": 0, "epochs": 0, "skipped": CROPS_SKIPPED}
            if self.rank == 0:
                write_json_atomic(self.run_dir / CROP_READER_FILE, summary)
                print(f"crop reader: {summary}", file=sys.stderr)
        if trained:
            freeze_crop_reader(model)

    def crop_reader_trained(self) -> bool:
        """Whether the run's crop-reader phase ran (a run from before ``crop_reader.json`` said
        so when it was skipped: it ran)."""
        path = self.run_dir / CROP_READER_FILE
        if not path.exists():
            return True
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("train_breasts", 1)) > 0
        except (ValueError, AttributeError) as e:
            raise MammorgError(f"{path}: not the crop reader's summary ({e}); restore it or start a new run_dir") from e

    @property
    def model(self) -> MultiViewClassifier:
        module = self.backend.module
        assert isinstance(module, MultiViewClassifier)
        return module

    def crop_boxes(self, batch: dict) -> torch.Tensor | None:
        """The boxes the lesion crops are cut around in training (``train.crop_jitter``: moved
        off the lesions' centres); ``None`` without crops or boxes."""
        boxes = batch.get("boxes")
        crops = self.model.crops
        if crops is None or boxes is None or not self.cfg.train.crop_jitter:
            return None if crops is None else boxes
        return crops.shifted(boxes, batch["images"].shape[-2], self.cfg.train.crop_jitter)

    def train_step(self, batch: dict, last_of_epoch: bool = False) -> torch.Tensor:
        """One optimiser (micro-)step on a batch, moved to the device; the loss, detached."""
        cfg, device = self.cfg, self.device
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = self.backend.model(batch["images"], batch["view_mask"], self.crop_boxes(batch))
        loss = stage1_loss(
            {k: v.float() for k, v in out.items()},
            batch,
            cfg.train.focal_gamma,
            self.birads_weights,
            cfg.train.localisation_weight,
        )
        self.backend.backward(loss)
        self.backend.step(last_of_epoch=last_of_epoch)
        return loss.detach()

    def train_epoch(self, epoch: int) -> float:
        # the epoch's loss is summed where it is computed (float64, as Python floats would be):
        # reading it every step would make the GPU wait for each step before the next is queued
        total, steps = torch.zeros((), dtype=torch.float64, device=self.device), 0
        batches = epoch_batches(self.train_loader, epoch)
        for step, batch in enumerate(tqdm(batches, desc=f"stage1 epoch {epoch}", leave=False, disable=self.rank != 0)):
            total += self.train_step(batch, last_of_epoch=step + 1 == len(batches))
            steps += 1
        return mean_over_ranks(total.item() / max(steps, 1))

    def validate(self, epoch: int, train_loss: float) -> tuple[float | None, dict[str, Any]]:
        """Rank 0 scores the validation split (metrics.selection_score)."""
        if self.rank != 0:
            return None, {}
        val = stage1_metrics(*validation_pass(self.model, self.val_loader, self.device)) if self.val_loader else {}
        return val.get("score"), {"val": val}

    def write_weights(self, folder: Path) -> None:
        if self.rank == 0:
            save_tensors(self.model.state_dict(), folder / WEIGHTS)

    def read_weights(self, folder: Path) -> None:
        missing, unexpected = self.model.load_state_dict(load_tensors(folder / WEIGHTS), strict=False)
        if missing or unexpected:
            names = ", ".join([*missing, *unexpected][:3])
            raise MammorgError(
                f"{folder / WEIGHTS}: the checkpoint does not match this config's model ({names}); "
                "resume with the run's own config.yaml or start a new run_dir"
            )

    def finish(self) -> None:
        """Rank 0: back to the best checkpoint, its validation operating points, plots."""
        if self.rank != 0:
            return
        best = self.checkpoints.weights("best")
        if best is not None:
            self.read_weights(best)
        trained_now = self.start_epoch < (
            self.epochs if self.stop_after is None else min(self.epochs, self.start_epoch + self.stop_after)
        )
        saved = (self.run_dir / OPERATING_POINTS_FILE).exists() and not trained_now
        points = OperatingPoints.load(self.run_dir) if saved or best is None else self.fit_operating_points()
        log = self.run_dir / "metrics.jsonl"
        if self.plots and log.exists():
            learning_curve_png(log, self.run_dir / "learning_curve.png")
            if len(self.val_ds):
                records = predict_dataset(self.model.eval(), self.val_ds, progress=False, points=points)
                confusion_pngs(records, self.val_ds.exams, self.run_dir)

    def fit_operating_points(self) -> OperatingPoints:
        """The validation operating points of the model (the best checkpoint), saved in the run."""
        if self.val_loader is None:
            return OperatingPoints()
        points = fit_from_outputs(*validation_pass(self.model, self.val_loader, self.device))
        points.save(self.run_dir)
        print(
            f"operating points: BI-RADS prior power {points.birads_prior_power}, finding thresholds "
            f"{list(points.finding_thresholds)}",
            file=sys.stderr,
        )
        return points

    def result(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "best_score": self.best if math.isfinite(self.best) else None}


def train(cfg: Stage1Config, plots: bool = True) -> dict[str, Any]:
    """Train (or resume, or re-finish) a stage-1 run."""
    return Stage1Recipe(cfg, plots).run()
