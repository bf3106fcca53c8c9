"""Training back-ends with one interface: plain PyTorch (one process, or DDP across ranks) and
DeepSpeed ZeRO-2/3.

``backend.model`` is what the loop calls; ``backward``/``step`` hide gradient accumulation;
``gathered`` collects ZeRO-3 partitions so that saved weights are complete, not empty;
``save_state``/``load_state`` write and read the resumable training state into a checkpoint
folder (DeepSpeed: its own shards, weights included).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mammorg.io import MammorgError
from mammorg.training.checkpoint import load_state, save_state

STATE_FILE = "training_state.pt"


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def init_distributed(use_deepspeed: bool) -> torch.device:
    """Join the process group when launched with several ranks (NCCL on GPUs, gloo on CPU) and
    return this rank's device."""
    _, n = world()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif n > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def leave_distributed() -> None:
    """Leave the process group that ``init_distributed`` joined, before the interpreter exits.

    Left to interpreter shutdown, gloo's threads can be destroyed while still joinable and a rank
    aborts ("terminate called without an active exception") after its work is saved. Local: no
    collective, so it cannot hang when another rank has failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fill_deepspeed_config(
    path: str | Path, batch_size: int, grad_accum: int, n_ranks: int, bf16: bool, clip: float
) -> dict:
    """Read a ZeRO JSON file and fill its ``"auto"`` values from the recipe's settings."""
    from mammorg.config import resolve_config

    source = resolve_config(path)
    try:
        cfg = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MammorgError(f"{source}: unreadable DeepSpeed config ({exc})") from None
    auto = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * n_ranks,
        "gradient_clipping": clip,
    }
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16
    zero = cfg.get("zero_optimization", {})
    defaults = {
        "reduce_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
    }
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return cfg


class TorchBackend:
    """Plain PyTorch: one process, or DDP when the model is wrapped; bf16 autocast on CUDA is
    the recipe's."""

    zero_stage = 0

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        grad_accum: int,
        clip: float,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self.grad_accum, self.clip, self._micro = grad_accum, clip, 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, last_of_epoch: bool = False) -> None:
        self._micro += 1
        if self._micro % self.grad_accum == 0 or last_of_epoch:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def restores_weights(self) -> bool:
        """Whether ``load_state`` brings the weights back too (else the recipe reads them)."""
        return False

    def save_state(self, folder: Path, client: dict[str, Any]) -> None:
        if world()[0] == 0:
            save_state(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    **client,
                },
                folder / STATE_FILE,
            )

    def load_state(self, folder: Path) -> dict[str, Any]:
        state = load_state(folder / STATE_FILE)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        yield


class DeepSpeedBackend(TorchBackend):
    """DeepSpeed engine (ZeRO-2/3); resumable through DeepSpeed's own checkpoint shards."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ds_config: dict,
    ):
        import deepspeed

        self._ds = deepspeed
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.model, self.module, self.optimizer, self.scheduler = engine, engine.module, optimizer, scheduler
        self.engine: Any = engine  # DeepSpeedEngine (its API is not typed)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, last_of_epoch: bool = False) -> None:
        self.engine.step()

    @property
    def restores_weights(self) -> bool:
        return True

    def save_state(self, folder: Path, client: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", client_state=client)

    def load_state(self, folder: Path) -> dict[str, Any]:
        _, client = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        if client is None:
            raise MammorgError(f"{folder / 'deepspeed'}: DeepSpeed checkpoint could not be loaded")
        return dict(client)

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        if self.zero_stage == 3:
            with self._ds.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield


def make_backend(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    deepspeed_config: str | None,
    batch_size: int,
    grad_accum: int,
    clip: float,
    max_zero_stage: int = 3,
) -> TorchBackend:
    """DeepSpeed when ``deepspeed_config`` is set; else plain PyTorch (DDP on several ranks)."""
    _, n_ranks = world()
    if deepspeed_config:
        ds = fill_deepspeed_config(deepspeed_config, batch_size, grad_accum, n_ranks, torch.cuda.is_available(), clip)
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if stage > max_zero_stage:
            raise MammorgError(f"{deepspeed_config}: this recipe supports ZeRO stages 0-{max_zero_stage}")
        return DeepSpeedBackend(model, optimizer, scheduler, ds)
    wrapped = DistributedDataParallel(model) if n_ranks > 1 else model
    return TorchBackend(wrapped, optimizer, scheduler, grad_accum, clip)
