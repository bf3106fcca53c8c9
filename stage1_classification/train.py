"""Recipe: ``mammorg stage1 train --config configs/stage1/<name>.yaml [key=value ...]``.

setup → train (resumable, deterministic data order) → save (last + best checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from mammorg.checkpoint import (load_training_state, load_weights, save_training_state,
                                save_weights)
from mammorg.config import load_config, save_config
from mammorg.io import MammorgError
from mammorg.optim import cosine_with_warmup
from stage1_classification.data import ExamDataset, birads_class_weights, collate
from stage1_classification.inference import predict_dataset
from stage1_classification.metrics import stage1_metrics
from stage1_classification.model import create_model, stage1_loss
from stage1_classification.plots import confusion_pngs, learning_curve_png


def _loader(ds: ExamDataset, cfg: DictConfig, epoch: int, shuffle: bool) -> DataLoader:
    ds.epoch = epoch
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1000 + epoch)
    return DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=shuffle, generator=gen,
                      num_workers=cfg.data.num_workers, collate_fn=collate)


def _forward(model, batch, device):
    return model(batch["images"].to(device), batch["view_mask"].to(device))


@torch.no_grad()
def evaluate(model, ds: ExamDataset, cfg: DictConfig, device) -> dict:
    model.eval()
    outputs, batches = [], []
    for batch in _loader(ds, cfg, 0, shuffle=False):
        out = _forward(model, batch, device)
        outputs.append({k: v.float().cpu() for k, v in out.items() if k != "tokens"})
        batches.append(batch)
    model.train()
    return stage1_metrics(outputs, batches) if outputs else {}


def train_epoch(model, loader, optimizer, scheduler, cfg: DictConfig, device, epoch: int,
                birads_weights: torch.Tensor | None = None) -> float:
    losses, accum = [], cfg.train.grad_accum
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(tqdm(loader, desc=f"stage1 epoch {epoch}", leave=False)):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = _forward(model, batch, device)
        loss = stage1_loss({k: v.float() for k, v in out.items()}, batch, cfg.train.focal_gamma,
                           birads_weights)
        (loss / accum).backward()
        if (step + 1) % accum == 0 or step + 1 == len(loader):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def run(cfg: DictConfig, plots: bool = True) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    steps = cfg.train.epochs * math.ceil(len(train_ds) / cfg.train.batch_size / cfg.train.grad_accum)
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, steps)
    start, best = 0, -1.0
    last = run_dir / "checkpoints" / "last"
    if cfg.train.resume and (last / "training_state.pt").exists():
        load_weights(model, last / "model.safetensors")
        state = load_training_state(last / "training_state.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, best = int(state["epoch"]) + 1, float(state["best"])
        print(f"resumed from {last} at epoch {start}")
    log = run_dir / "metrics.jsonl"
    weights = birads_class_weights(train_ds, cfg.train.class_weight_power).to(device) \
        if cfg.train.class_weight_power else None
    stop = cfg.train.epochs if cfg.train.stop_after_epochs is None else \
        min(cfg.train.epochs, start + cfg.train.stop_after_epochs)
    for epoch in range(start, stop):
        loss = train_epoch(model, _loader(train_ds, cfg, epoch, True), optimizer, scheduler, cfg,
                           device, epoch, weights)
        val = evaluate(model, val_ds, cfg, device) if len(val_ds) else {}
        _append_log(log, {"epoch": epoch, "train_loss": loss, "val": val})
        print(f"epoch {epoch}: train_loss={loss:.4f} val_score={val.get('score', float('nan')):.3f}")
        score = val.get("score", -loss)
        if not math.isnan(score) and score > best:
            best = score
            save_weights(model, run_dir / "checkpoints" / "best" / "model.safetensors")
        save_weights(model, last / "model.safetensors")
        save_training_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best},
                            last / "training_state.pt")
    if plots and log.exists():
        write_plots(model, val_ds, run_dir, log)
    return {"run_dir": str(run_dir), "best_score": best}


def write_plots(model, val_ds: ExamDataset, run_dir: Path, log: Path) -> None:
    """Learning curve, and confusion matrices of the best checkpoint on the validation split."""
    learning_curve_png(log, run_dir / "learning_curve.png")
    best = run_dir / "checkpoints" / "best" / "model.safetensors"
    if len(val_ds) and best.exists():
        load_weights(model, best)
        records = predict_dataset(model.eval(), val_ds, progress=False)
        confusion_pngs(records, val_ds.exams, run_dir)


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run(cfg)))
