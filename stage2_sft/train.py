"""Recipe: ``mammorg stage2 train --config configs/stage2/<name>.yaml [key=value ...]``.

Also under a launcher, e.g. ``deepspeed --num_gpus 8 -m mammorg.cli stage2 train --config ...
deepspeed.config=configs/deepspeed/zero3.json`` or ``torchrun --nproc_per_node 2 ...``.
setup (tokenizer → decoder → LoRA → generator) → train (length-grouped batches, report-only loss,
resumable per epoch) → save (complete weights gathered from ZeRO-3; last + best by validation loss).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from mammorg.config import load_config, save_config
from mammorg.io import MammorgError, atomic_path, read_jsonl
from mammorg.optim import cosine_with_warmup
from stage2_sft.assembly import (apply_lora, build_decoder, build_tokenizer, category_weights,
                                 check_config, compile_generator, gold_heads, make_builder, wrap)
from stage2_sft.data import PromptBuilder, ReportDataset, collate, length_grouped_batches
from mammorg.distributed import (DeepSpeedBackend, TorchBackend, barrier, fill_deepspeed_config,
                               init_distributed, world)


def visual_shape(predictions: str | Path) -> tuple[int, int]:
    """(tokens per view, feature dim) of the stage-1 feature files named in the predictions."""
    path = Path(predictions)
    rows = read_jsonl(path)
    if not rows or "features" not in rows[0]:
        raise MammorgError(f"{path}: no feature tokens (run 'mammorg stage1 predict' with features)")
    rel = Path(rows[0]["features"])
    tokens = load_file(str(rel if rel.is_absolute() else path.parent / rel))["tokens"]
    return int(tokens.shape[1]), int(tokens.shape[2])


def prepare_tokenizer(cfg: DictConfig, run_dir: Path, rank: int):
    """Rank 0 builds (or a resumed run reuses) the tokenizer; every rank then loads it."""
    folder = run_dir / "tokenizer"
    pieces_file = folder / "term_pieces.json"
    if rank == 0 and not pieces_file.exists():
        texts = [r["report"] for r in read_jsonl(cfg.data.manifest)
                 if r.get("split") == cfg.data.train_split and r.get("report")]
        if not texts:
            raise MammorgError(f"{cfg.data.manifest}: no reports in split '{cfg.data.train_split}'")
        _, pieces = build_tokenizer(cfg, texts, folder)
        with atomic_path(pieces_file) as tmp:
            tmp.write_text(json.dumps(pieces))
    barrier()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok, json.loads(pieces_file.read_text())


def build_generator(cfg: DictConfig, tok, pieces: dict, run_dir: Path, rank: int):
    """Decoder (+ LoRA, saving the frozen base once) wrapped with projector and knowledge."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    decoder = build_decoder(cfg, tok, pieces)
    if cfg.lora.enabled:
        base = run_dir / "base_decoder"
        if rank == 0 and not (base / "config.json").exists():
            decoder.save_pretrained(str(base) + ".tmp", safe_serialization=True)
            shutil.rmtree(base, ignore_errors=True)
            Path(str(base) + ".tmp").rename(base)
        decoder = apply_lora(decoder, cfg.lora)
    if cfg.decoder.gradient_checkpointing:
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap(cfg, decoder, tok, cfg.visual.dim)
    if cfg.train.get("compile", False):
        compile_generator(model)
    return model


def datasets(cfg: DictConfig, tok) -> tuple[ReportDataset, ReportDataset, PromptBuilder]:
    builder = make_builder(cfg, tok)
    make = lambda split, **kw: ReportDataset(cfg.data.manifest, cfg.data.predictions,  # noqa: E731
                                             builder, split, cfg.knowledge.source, **kw)
    train = make(cfg.data.train_split, gold_fraction=float(cfg.knowledge.gold_fraction), seed=cfg.seed,
                 gold_heads=gold_heads(cfg))
    if len(train) == 0:
        raise MammorgError(f"{cfg.data.manifest}: no exams with reports in split '{cfg.data.train_split}'")
    return train, make(cfg.data.val_split), builder


def _device_batch(batch: dict, device: torch.device) -> dict:
    out = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    out["knowledge"] = {k: v.to(device) for k, v in batch["knowledge"].items()}
    return out


def _loss(backend, batch: dict, device: torch.device) -> torch.Tensor:
    b = _device_batch(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return backend.model(b["input_ids"], b["attention_mask"], b["labels"], b.get("visual"),
                             b["knowledge"])


@torch.no_grad()
def validation_loss(backend, ds: ReportDataset, pad_id: int, batch_size: int,
                    device: torch.device) -> float | None:
    if len(ds) == 0:
        return None
    backend.module.eval()
    losses = [float(_loss(backend, collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))],
                                            pad_id), device))
              for i in range(0, len(ds), batch_size)]
    backend.module.train()
    return sum(losses) / len(losses)


def save_weights(backend, cfg: DictConfig, folder: Path, rank: int) -> None:
    """Complete weights (ZeRO-3 partitions gathered): decoder (full or adapter) + extras."""
    module = backend.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not cfg.lora.enabled]
    state = {}
    with backend.gathered([p for _, p in named]):
        if rank == 0:
            state = {n: p.detach().float().cpu().clone() for n, p in named}
    if rank != 0:
        return
    extras = {n: v.contiguous() for n, v in state.items() if not n.startswith("decoder.")}
    save_file(extras, str(folder / "extras.safetensors"))
    decoder_state = {n[len("decoder."):]: v for n, v in state.items() if n.startswith("decoder.")}
    module.decoder.save_pretrained(str(folder / "decoder"), state_dict=decoder_state,
                                   safe_serialization=True)


def save_checkpoint(backend, cfg: DictConfig, run_dir: Path, client: dict, is_best: bool,
                    rank: int) -> None:
    """``checkpoints/last`` (weights + resumable state), swapped in whole; ``best`` copies weights."""
    ckpts = run_dir / "checkpoints"
    tmp, last = ckpts / "last.tmp", ckpts / "last"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    backend.save_state(tmp, client)
    save_weights(backend, cfg, tmp, rank)
    barrier()
    if rank == 0:
        old = ckpts / "last.old"
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
        if is_best:
            best = ckpts / "best"
            shutil.rmtree(best, ignore_errors=True)
            best.mkdir()
            shutil.copytree(last / "decoder", best / "decoder")
            shutil.copy2(last / "extras.safetensors", best / "extras.safetensors")
    barrier()


def make_backend(cfg: DictConfig, model, steps: int, n_ranks: int):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.cuda.is_available() and not cfg.deepspeed.config  # one kernel for all parameters
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, steps)
    if cfg.deepspeed.config:
        ds = fill_deepspeed_config(cfg.deepspeed.config, cfg.train.batch_size, cfg.train.grad_accum,
                                   n_ranks, torch.cuda.is_available(), cfg.train.clip)
        return DeepSpeedBackend(model, optimizer, scheduler, ds)
    return TorchBackend(model, optimizer, scheduler, cfg.train.grad_accum, cfg.train.clip)


def _log(run_dir: Path, row: dict, rank: int) -> None:
    if rank == 0:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def train_epoch(backend, ds: ReportDataset, batches: list[list[int]], pad_id: int,
                device: torch.device, epoch: int, rank: int) -> float:
    losses = []
    for i, idx in enumerate(tqdm(batches, desc=f"stage2 epoch {epoch}", disable=rank != 0, leave=False)):
        loss = _loss(backend, collate([ds[j] for j in idx], pad_id), device)
        backend.backward(loss)
        backend.step(last_of_epoch=i + 1 == len(batches))
        losses.append(float(loss.detach()))
    return sum(losses) / max(len(losses), 1)


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    init_distributed(bool(cfg.deepspeed.config))
    rank, n_ranks = world()
    run_dir = Path(cfg.run_dir)
    if cfg.visual.dim is None or cfg.visual.tokens_per_view is None:
        cfg.visual.tokens_per_view, cfg.visual.dim = visual_shape(cfg.data.predictions)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    tok, pieces = prepare_tokenizer(cfg, run_dir, rank)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    model = build_generator(cfg, tok, pieces, run_dir, rank).to(device)
    train_ds, val_ds, _ = datasets(cfg, tok)
    weights = category_weights(cfg, tok, (train_ds.report_ids(i) for i in range(len(train_ds))),
                               model.term_weights)
    model.term_weights = None if weights is None else weights.to(device)
    lengths = train_ds.lengths()
    per_epoch = len(length_grouped_batches(lengths, cfg.train.batch_size, cfg.seed, 0, rank, n_ranks))
    backend = make_backend(cfg, model, cfg.train.epochs * math.ceil(per_epoch / cfg.train.grad_accum),
                           n_ranks)
    start, best = 0, math.inf
    last = run_dir / "checkpoints" / "last"
    if cfg.train.resume and (last / "extras.safetensors").exists():
        client = backend.load_state(last)
        torch.set_rng_state(client["torch_rng"])
        start, best = int(client["epoch"]) + 1, float(client["best"])
        if rank == 0:
            print(f"resumed from {last} at epoch {start}", file=sys.stderr)
    stop = cfg.train.epochs if cfg.train.stop_after_epochs is None else \
        min(cfg.train.epochs, start + cfg.train.stop_after_epochs)
    for epoch in range(start, stop):
        batches = length_grouped_batches(lengths, cfg.train.batch_size, cfg.seed, epoch, rank, n_ranks)
        train_ds.epoch = epoch
        loss = train_epoch(backend, train_ds, batches, tok.pad_token_id, device, epoch, rank)
        val = validation_loss(backend, val_ds, tok.pad_token_id, cfg.train.batch_size, device)
        score = val if val is not None else loss
        _log(run_dir, {"epoch": epoch, "train_loss": loss, "val_loss": val,
                       "lr": backend.scheduler.get_last_lr()[0]}, rank)
        if rank == 0:
            print(f"epoch {epoch}: train_loss={loss:.4f} val_loss={val if val is None else round(val, 4)}",
                  file=sys.stderr)
        is_best = score < best
        best = min(best, score)
        save_checkpoint(backend, cfg, run_dir, {"epoch": epoch, "best": best,
                                                "torch_rng": torch.get_rng_state()}, is_best, rank)
    return {"run_dir": str(run_dir), "best_val_loss": best if math.isfinite(best) else None}


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    result = run(cfg)
    if world()[0] == 0:
        print(json.dumps(result))
