"""Stage-1 throughput: the training/inference recipe vs. bare timm on the same tensors.

Usage: python benchmarks/stage1_throughput.py [--backbone convnext_small] [--size 1024 512] [--exams 128]
Defaults: convnext_small at 1024x512 on 128 exams on a GPU (bf16, 6 loader workers), resnet10t at
256x128 on 24 exams on CPU. The recipe figure includes data loading from the preprocessing cache
(worker start-up of each pass too; a long pass, the set ``--infer-repeat`` times over, spreads
it as a real archive does); the bare figure is timm's forward/backward (+AdamW) on
tensors already in memory. Where the recipe's time goes: its loader alone (an epoch with no model)
and its training step alone (one batch already on the device, heads and loss included). Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

from evaluation.parser import parse_report  # noqa: E402
from mammorg.config import load_config  # noqa: E402
from mammorg.data.ingest import ingest  # noqa: E402
from mammorg.io import read_jsonl, write_jsonl_atomic  # noqa: E402
from mammorg.preprocess import PreprocessSpec, preprocess_manifest  # noqa: E402
from mammorg.synth.writer import SynthSettings, synthesise  # noqa: E402
from stage1_classification.config import Stage1Config  # noqa: E402
from stage1_classification.data import ExamDataset  # noqa: E402
from stage1_classification.inference import predict_dataset  # noqa: E402
from stage1_classification.train import Stage1Recipe, epoch_batches  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache(tmp: Path, exams: int, size: tuple[int, int], workers: int) -> Path:
    settings = SynthSettings(exams=exams, seed=5, height=size[0], width=size[1])
    synthesise(tmp / "synth", settings, progress=False, workers=workers)
    ingest("vindr", tmp / "synth", tmp / "m.jsonl", parse_report)
    write_jsonl_atomic(tmp / "m.jsonl", [{**r, "split": "train"} for r in read_jsonl(tmp / "m.jsonl")])
    preprocess_manifest(tmp / "m.jsonl", tmp / "cache", PreprocessSpec(*size), workers=workers, progress=False)
    return tmp / "cache" / "manifest.jsonl"


def bare_timm(backbone: str, views: int, size, device, steps: int, amp: bool) -> dict:
    model = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(views, 1, *size, device=device)
    flops = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        try:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(x).float().mean().backward()
            flops = counter.get_total_flops() / views
        except Exception:
            flops = None
        for _ in range(2):
            model(x).float().mean().backward()
            opt.step()
            opt.zero_grad()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x).float().mean().backward()
            opt.step()
            opt.zero_grad()
        _sync(device)
        train = views * steps / (time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(steps):
                model(x)
            _sync(device)
            infer = views * steps / (time.perf_counter() - t0)
    return {"train_views_s": train, "infer_views_s": infer, "flops_per_view_train": flops}


class Repeated(ExamDataset):
    """The exams of a cache ``times`` over in one pass (a long inference pass: the loader's
    worker start-up spread over it, as over a real archive)."""

    def __init__(self, manifest: Path, times: int):
        super().__init__(manifest)
        self.unique = len(self.exams)
        self.exams = self.exams * times

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        return super().__getitem__(key % self.unique if isinstance(key, int) else key)


def recipe(manifest: Path, backbone: str, device, batch: int, epochs: int, workers: int, repeat: int) -> dict:
    """The stage-1 recipe's own epochs (data loading, augmentation, loss, back-end step)."""
    cfg = load_config(
        "stage1/default",
        Stage1Config,
        [
            f"data.cache_manifest={manifest}",
            f"model.backbone={backbone}",
            f"train.batch_size={batch}",
            f"data.num_workers={workers}",
            f"run_dir={manifest.parent / 'run'}",
        ],
    )
    run = Stage1Recipe(cfg, plots=False)
    run.setup()
    views = sum(len(e.cache or {}) for e in run.train_ds.exams)
    run.train_epoch(0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        run.train_epoch(epoch)
    _sync(device)
    train = views * epochs / (time.perf_counter() - t0)
    # where the recipe's time goes: its loader alone (no model), and its step alone on one batch
    # already on the device (no loading)
    t0 = time.perf_counter()
    loaded = sum(int(b["view_mask"].sum()) for b in epoch_batches(run.train_loader, epochs + 1))
    loader_only = loaded / (time.perf_counter() - t0)
    first = next(iter(epoch_batches(run.train_loader, epochs + 2)))
    one = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in first.items()}
    steps = max(3, len(run.train_ds) * epochs // batch)
    run.train_step(one)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run.train_step(one)
    _sync(device)
    step_only = int(one["view_mask"].sum()) * steps / (time.perf_counter() - t0)
    model = run.model.eval()
    t0 = time.perf_counter()
    predict_dataset(model, ExamDataset(manifest), batch, progress=False, num_workers=workers)  # bf16 on GPU
    _sync(device)
    infer = views / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    predict_dataset(model, Repeated(manifest, repeat), batch, progress=False, num_workers=workers)
    _sync(device)
    return {
        "train_views_s": train,
        "infer_views_s": infer,
        "infer_long_pass_views_s": views * repeat / (time.perf_counter() - t0),
        "loader_only_views_s": loader_only,
        "step_only_views_s": step_only,
    }


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="convnext_small" if gpu else "resnet10t")
    ap.add_argument("--size", type=int, nargs=2, default=[1024, 512] if gpu else [256, 128])
    ap.add_argument("--exams", type=int, default=128 if gpu else 24)
    ap.add_argument("--batch", type=int, default=8 if gpu else 4, help="exams per batch (4 views each)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=6 if gpu else 0)
    ap.add_argument("--infer-repeat", type=int, default=8, help="the long inference pass: the set this many times")
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    torch.backends.cudnn.benchmark = gpu
    size = tuple(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = cache(Path(tmp), args.exams, size, max(2, args.workers))
        ours = recipe(manifest, args.backbone, device, args.batch, args.epochs, args.workers, args.infer_repeat)
    steps = max(3, args.exams * args.epochs // args.batch // 2)
    bare = bare_timm(args.backbone, 4 * args.batch, size, device, steps, gpu)
    out = {
        "benchmark": "stage1_throughput",
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "backbone": args.backbone,
        "size": list(size),
        "precision": "bf16" if gpu else "fp32",
        "batch_views": 4 * args.batch,
        "recipe_train_views_s": round(ours["train_views_s"], 2),
        "bare_timm_train_views_s": round(bare["train_views_s"], 2),
        "train_ratio": round(ours["train_views_s"] / bare["train_views_s"], 3),
        "recipe_infer_views_s": round(ours["infer_views_s"], 2),
        "bare_timm_infer_views_s": round(bare["infer_views_s"], 2),
        "infer_ratio": round(ours["infer_views_s"] / bare["infer_views_s"], 3),
        "recipe_infer_long_pass_views_s": round(ours["infer_long_pass_views_s"], 2),
        "infer_long_pass_ratio": round(ours["infer_long_pass_views_s"] / bare["infer_views_s"], 3),
        "recipe_loader_only_views_s": round(ours["loader_only_views_s"], 2),
        "recipe_step_only_views_s": round(ours["step_only_views_s"], 2),
    }
    if gpu and bare["flops_per_view_train"]:
        peak = next((v for k, v in PEAK_BF16.items() if k in out["device"]), None)
        if peak:
            out["bare_mfu"] = round(bare["flops_per_view_train"] * bare["train_views_s"] / peak, 3)
            out["recipe_mfu_backbone"] = round(bare["flops_per_view_train"] * ours["train_views_s"] / peak, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
