"""Training back-ends with one interface: plain PyTorch (one process) and DeepSpeed ZeRO-2/3.

``backend.model`` is what the loop calls; ``backward``/``step`` hide gradient accumulation;
``gathered`` collects ZeRO-3 partitions so that saved weights are complete, not empty.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mammorg.checkpoint import load_training_state, save_training_state
from mammorg.io import MammorgError, atomic_path


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def fill_deepspeed_config(path: str | Path, batch_size: int, grad_accum: int, n_ranks: int,
                          bf16: bool, clip: float) -> dict:
    """Read a ZeRO JSON file and fill its ``"auto"`` values from the recipe's settings."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MammorgError(f"{path}: unreadable DeepSpeed config ({exc})") from None
    auto = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": batch_size * grad_accum * n_ranks, "gradient_clipping": clip}
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16
    zero = cfg.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = {"reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
                         "stage3_param_persistence_threshold": 1e5}[key]
    return cfg


class TorchBackend:
    """One process, plain PyTorch; bf16 autocast on CUDA."""

    zero_stage = 0

    def __init__(self, model: nn.Module, optimizer, scheduler, grad_accum: int, clip: float):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.grad_accum, self.clip, self._micro = grad_accum, clip, 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, last_of_epoch: bool = False) -> None:
        self._micro += 1
        if self._micro % self.grad_accum == 0 or last_of_epoch:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], self.clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, folder: Path, client: dict) -> None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters()
                     if p.requires_grad}
        with atomic_path(folder / "trainable.safetensors") as tmp:
            save_file(trainable, str(tmp))
        save_training_state({"optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(), **client},
                            folder / "training_state.pt")

    def load_state(self, folder: Path) -> dict:
        weights = load_file(str(folder / "trainable.safetensors"))
        unexpected = self.module.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise MammorgError(f"{folder}: checkpoint does not match the model ({unexpected[0]})")
        state = load_training_state(folder / "training_state.pt")
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter]):
        yield


class DeepSpeedBackend(TorchBackend):
    """DeepSpeed engine (ZeRO-2/3); resumable through DeepSpeed's own checkpoint shards."""

    def __init__(self, model: nn.Module, optimizer, scheduler, ds_config: dict):
        import deepspeed

        self._ds = deepspeed
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.model, self.module, self.optimizer, self.scheduler = engine, engine.module, optimizer, scheduler
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self, last_of_epoch: bool = False) -> None:
        self.model.step()

    def save_state(self, folder: Path, client: dict) -> None:
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state", client_state=client)

    def load_state(self, folder: Path) -> dict:
        _, client = self.model.load_checkpoint(str(folder / "deepspeed"), tag="state")
        if client is None:
            raise MammorgError(f"{folder}: DeepSpeed checkpoint could not be loaded")
        return client

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter]):
        if self.zero_stage == 3:
            with self._ds.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield


def init_distributed(use_deepspeed: bool) -> None:
    """Initialise the process group when launched with several ranks (gloo on CPU)."""
    rank, n = world()
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    elif n > 1:
        raise MammorgError("several ranks need a DeepSpeed config (deepspeed.config=...)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
