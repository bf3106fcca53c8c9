"""Recipe: ``mammorg stage1 train --config configs/stage1/<name>.yaml [key=value ...]``.

Several GPUs (DDP): ``torchrun --nproc_per_node N -m mammorg.cli stage1 train --config ...``.

setup → train (resumable, deterministic data order) → save (last + best checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mammorg.checkpoint import (load_training_state, load_weights, save_training_state,
                                save_weights)
from mammorg.config import load_config, save_config
from mammorg.distributed import (DeepSpeedBackend, TorchBackend, fill_deepspeed_config,
                                 init_distributed)
from mammorg.io import MammorgError
from mammorg.optim import cosine_with_warmup
from stage1_classification.data import ExamDataset, birads_class_weights, collate
from stage1_classification.inference import predict_dataset
from stage1_classification.metrics import stage1_metrics
from stage1_classification.model import create_model, stage1_loss
from stage1_classification.operating_points import FILENAME as OPERATING_POINTS_FILE
from stage1_classification.operating_points import OperatingPoints, fit_from_outputs
from stage1_classification.plots import confusion_pngs, learning_curve_png


def _loader(ds: ExamDataset, cfg: DictConfig, epoch: int, shuffle: bool, rank: int = 0,
            world: int = 1) -> DataLoader:
    """Deterministic order per (seed, epoch); with several ranks each takes an equal shard."""
    ds.epoch = epoch
    common = dict(batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate,
                  pin_memory=torch.cuda.is_available())
    if world > 1:
        sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=int(cfg.seed))
        sampler.set_epoch(epoch)
        return DataLoader(ds, sampler=sampler, **common)
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1000 + epoch)
    return DataLoader(ds, shuffle=shuffle, generator=gen, **common)


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under torchrun (NCCL or gloo)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def _forward(model, batch, device):
    return model(batch["images"].to(device), batch["view_mask"].to(device))


@torch.no_grad()
def validation_pass(model, ds: ExamDataset, cfg: DictConfig, device) -> tuple[list[dict], list[dict]]:
    """Head outputs (logits, on the CPU) and the label batches of every exam of ``ds``."""
    model.eval()
    outputs, batches = [], []
    for batch in _loader(ds, cfg, 0, shuffle=False):
        out = _forward(model, batch, device)
        outputs.append({k: v.float().cpu() for k, v in out.items() if k != "tokens"})
        batches.append(batch)
    model.train()
    return outputs, batches


def evaluate(model, ds: ExamDataset, cfg: DictConfig, device) -> dict:
    outputs, batches = validation_pass(model, ds, cfg, device)
    return stage1_metrics(outputs, batches) if outputs else {}


def train_epoch(backend, loader, cfg: DictConfig, device, epoch: int,
                birads_weights: torch.Tensor | None = None) -> float:
    """One epoch through a back-end (plain/DDP or DeepSpeed), which handles accumulation."""
    losses = []
    for step, batch in enumerate(tqdm(loader, desc=f"stage1 epoch {epoch}", leave=False)):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = _forward(backend.model, batch, device)
        loss = stage1_loss({k: v.float() for k, v in out.items()}, batch, cfg.train.focal_gamma,
                           birads_weights)
        backend.backward(loss)
        backend.step(last_of_epoch=step + 1 == len(loader))
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def make_backend(cfg: DictConfig, model, optimizer, scheduler, world: int):
    """DeepSpeed (ZeRO 0-2) when ``deepspeed.config`` is set; else plain PyTorch, DDP on >1 rank."""
    if cfg.deepspeed.config:
        ds = fill_deepspeed_config(cfg.deepspeed.config, cfg.train.batch_size, cfg.train.grad_accum,
                                   world, torch.cuda.is_available(), 1.0)
        if int(ds.get("zero_optimization", {}).get("stage", 0)) > 2:
            raise MammorgError(f"{cfg.deepspeed.config}: stage 1 supports ZeRO stages 0-2")
        return DeepSpeedBackend(model, optimizer, scheduler, ds)
    return TorchBackend(DistributedDataParallel(model) if world > 1 else model, optimizer,
                        scheduler, cfg.train.grad_accum, 1.0)


def _resume(backend, last: Path) -> tuple[int, float]:
    """Weights, optimiser, scheduler and RNG from ``checkpoints/last``; returns (epoch, best)."""
    if isinstance(backend, DeepSpeedBackend):
        state = backend.load_state(last)
    else:
        load_weights(backend.module, last / "model.safetensors")
        state = load_training_state(last / "training_state.pt")
        backend.optimizer.load_state_dict(state["optimizer"])
        backend.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {last} at epoch {int(state['epoch']) + 1}", file=sys.stderr)
    return int(state["epoch"]) + 1, float(state["best"])


def _can_resume(last: Path) -> bool:
    return (last / "training_state.pt").exists() or (last / "deepspeed").exists()


def _save(backend, run_dir: Path, epoch: int, best: float, is_best: bool, rank: int) -> None:
    """Weights as safetensors (rank 0) and the resumable state (DeepSpeed: every rank)."""
    last = run_dir / "checkpoints" / "last"
    client = {"torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best}
    if rank == 0:
        if is_best:
            save_weights(backend.module, run_dir / "checkpoints" / "best" / "model.safetensors")
        save_weights(backend.module, last / "model.safetensors")
    if isinstance(backend, DeepSpeedBackend):
        backend.save_state(last, client)
    elif rank == 0:
        save_training_state({"optimizer": backend.optimizer.state_dict(),
                             "scheduler": backend.scheduler.state_dict(), **client},
                            last / "training_state.pt")


def _validate(model, val_ds: ExamDataset, cfg: DictConfig, device, log: Path, epoch: int,
              loss: float, best: float) -> tuple[float, bool]:
    """Rank 0: validation metrics, a log line; returns (best score, whether this epoch is best)."""
    val = evaluate(model, val_ds, cfg, device) if len(val_ds) else {}
    _append_log(log, {"epoch": epoch, "train_loss": loss, "val": val})
    print(f"epoch {epoch}: train_loss={loss:.4f} val_score={val.get('score', float('nan')):.3f}",
          file=sys.stderr)
    score = val.get("score", -loss)
    is_best = not math.isnan(score) and score > best
    return (score if is_best else best), is_best


def run(cfg: DictConfig, plots: bool = True) -> dict:
    if cfg.deepspeed.config:
        init_distributed(True)
    rank, world, device = distributed()
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    train_ds = ExamDataset(cfg.data.cache_manifest, cfg.data.train_split, augment=True, seed=cfg.seed,
                           folds=cfg.data.get("folds"), fold=cfg.data.get("fold"))
    val_ds = ExamDataset(cfg.data.cache_manifest, cfg.data.val_split)
    if len(train_ds) == 0:
        raise MammorgError(f"{cfg.data.cache_manifest}: no exams in split '{cfg.data.train_split}'")
    model = create_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    per_rank = math.ceil(len(train_ds) / world)
    steps = cfg.train.epochs * math.ceil(per_rank / cfg.train.batch_size / cfg.train.grad_accum)
    backend = make_backend(cfg, model, optimizer,
                           cosine_with_warmup(optimizer, cfg.train.warmup_steps, steps), world)
    last = run_dir / "checkpoints" / "last"
    start, best = _resume(backend, last) if cfg.train.resume and _can_resume(last) else (0, -1.0)
    weights = birads_class_weights(train_ds, cfg.train.class_weight_power).to(device) \
        if cfg.train.class_weight_power else None
    stop = cfg.train.epochs if cfg.train.stop_after_epochs is None else \
        min(cfg.train.epochs, start + cfg.train.stop_after_epochs)
    log = run_dir / "metrics.jsonl"
    for epoch in range(start, stop):
        loss = _mean_over_ranks(train_epoch(backend, _loader(train_ds, cfg, epoch, True, rank, world),
                                            cfg, device, epoch, weights), world)
        is_best = False
        if rank == 0:  # validation and log on rank 0; the others wait
            best, is_best = _validate(backend.module, val_ds, cfg, device, log, epoch, loss, best)
        _save(backend, run_dir, epoch, best, is_best, rank)
        _barrier(world)
    if rank == 0:
        best_weights = run_dir / "checkpoints" / "best" / "model.safetensors"
        if best_weights.exists():
            load_weights(backend.module, best_weights)
        saved = (run_dir / OPERATING_POINTS_FILE).exists() and start >= stop  # nothing trained now
        points = OperatingPoints.load(run_dir) if saved or not best_weights.exists() else \
            fit_operating_points(backend.module, val_ds, cfg, device, run_dir)
        if plots and log.exists():
            write_plots(backend.module, val_ds, run_dir, log, points)
    _barrier(world)
    return {"run_dir": str(run_dir), "best_score": best}


def fit_operating_points(model, val_ds: ExamDataset, cfg: DictConfig, device,
                         run_dir: Path) -> OperatingPoints:
    """The validation operating points of ``model`` (the best checkpoint), saved in the run."""
    if not len(val_ds):
        return OperatingPoints()
    points = fit_from_outputs(*validation_pass(model, val_ds, cfg, device))
    points.save(run_dir)
    print(f"operating points: BI-RADS prior power {points.birads_prior_power}, finding thresholds "
          f"{list(points.finding_thresholds)}", file=sys.stderr)
    return points


def write_plots(model, val_ds: ExamDataset, run_dir: Path, log: Path,
                points: OperatingPoints) -> None:
    """Learning curve, and confusion matrices of ``model`` (the best checkpoint) on validation."""
    learning_curve_png(log, run_dir / "learning_curve.png")
    if len(val_ds):
        records = predict_dataset(model.eval(), val_ds, progress=False, points=points)
        confusion_pngs(records, val_ds.exams, run_dir)


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    result = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
