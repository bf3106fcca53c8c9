"""Atomic checkpoints: weights as safetensors, training state loaded with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mammorg.io import atomic_path


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    model.load_state_dict(load_file(str(path)))


def save_training_state(state: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
