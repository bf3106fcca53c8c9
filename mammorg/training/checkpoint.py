"""Checkpoints that survive faults: written whole, verified when read, the previous one kept.

``RUN/checkpoints/`` holds ``last`` (the newest, with the resumable training state),
``previous`` (the one before: the fallback when ``last`` is damaged) and ``best`` (weights
only). Each is written into a temporary folder, listed with the size and sha256 of every file in
``manifest.json``, and only then renamed into place, so a crash or a full disk never leaves a
half-written checkpoint under a real name. Reading checks the manifest and names a damaged
checkpoint in one line; resuming then falls back to ``previous`` and says so.

Weights are safetensors; the training state (optimizer, scheduler, RNG) is a ``torch.save`` file
of tensors and plain types, read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mammorg.io import MammorgError, atomic_path, sha256_file

MANIFEST = "manifest.json"
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # a full disk shows up as any of these


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written atomically; a write error names the file. Tensors that share
    memory (tied embeddings) are written as copies."""
    seen: set[tuple[int, Any]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    with atomic_path(path) as tmp:
        try:
            save_file(out, str(tmp))
        except SafetensorError as exc:
            raise MammorgError(f"{path}: cannot write ({_first_line(exc)})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a damaged one is a one-line error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise MammorgError(f"{path}: damaged or unreadable weights ({_first_line(exc)})") from None


def save_state(state: dict[str, Any], path: Path) -> None:
    """The training state (tensors and plain types) written atomically."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports a failed write (a full disk) this way
            raise MammorgError(f"{path}: cannot write ({_first_line(exc)})") from None


def load_state(path: Path) -> dict[str, Any]:
    """The training state, unpickled with ``weights_only=True`` (no code runs from the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise MammorgError(f"{path}: damaged training state ({_first_line(exc)})") from None


def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    listing = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**meta, "files": listing}, indent=1), encoding="utf-8")


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (None: intact). A folder from before manifests
    existed is trusted as it is."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    try:
        listing = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{MANIFEST} unreadable: {exc}"
    for rel, entry in listing.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{rel} truncated ({path.stat().st_size} of {entry['bytes']} bytes)"
        if sha256_file(path) != entry["sha256"]:
            return f"{rel} corrupted (sha256 mismatch)"
    return None


def checkpoint_meta(folder: Path) -> dict[str, Any]:
    """What ``write_manifest`` recorded besides the files (epoch, ...)."""
    try:
        raw = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if k != "files"}


class CheckpointStore:
    """The checkpoints of one run (see the module docstring). Under several ranks every rank
    calls ``save`` (DeepSpeed writes a shard per rank); rank 0 writes manifests and renames."""

    def __init__(self, run_dir: str | Path, rank: int = 0, barrier: Callable[[], None] = lambda: None):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.barrier = rank, barrier

    def path(self, name: str) -> Path:
        return self.root / name

    def save(self, name: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``name`` through ``write(folder)``; ``last`` rotates to ``previous``.
        On an I/O error the message names the file and the checkpoint already there is kept."""
        tmp, final = self.root / f".{name}.tmp", self.root / name
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            write(tmp)
            self.barrier()
            if self.rank == 0:
                write_manifest(tmp, meta)
                self._rotate(tmp, final, keep_previous=name == "last")
        except MammorgError as exc:
            self._abandon(tmp)
            raise MammorgError(f"{exc}; checkpoint '{name}' not saved, {final} kept as it was") from None
        except WRITE_ERRORS as exc:
            self._abandon(tmp)
            where = getattr(exc, "filename", None) or tmp
            raise MammorgError(
                f"{where}: cannot write checkpoint ({_first_line(exc)}); {final} kept as it was"
            ) from None
        self.barrier()
        return final

    def _abandon(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _rotate(self, tmp: Path, final: Path, keep_previous: bool) -> None:
        old = self.root / ("previous" if keep_previous else f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        if not keep_previous:
            shutil.rmtree(old, ignore_errors=True)

    def resumable(self) -> Path | None:
        """The newest intact checkpoint to resume from (``last``, else ``previous``, saying so);
        None when the run has none. Only damaged ones: a one-line error naming them."""
        return self._first_intact(("last", "previous"), "resuming from")

    def weights(self, prefer: str = "best") -> Path | None:
        """The folder to read trained weights from: ``prefer``, else the newest intact one."""
        return self._first_intact((prefer, "last", "previous"), "using")

    def _first_intact(self, names: tuple[str, ...], verb: str) -> Path | None:
        damaged: list[str] = []
        for name in dict.fromkeys(names):
            folder = self.root / name
            if not folder.is_dir():
                continue
            problem = damage(folder)
            if problem is None:
                if damaged:
                    print(f"warning: {damaged[0]}; {verb} {folder}", file=sys.stderr)
                return folder
            damaged.append(f"checkpoint {folder} is damaged ({problem})")
        if damaged:
            raise MammorgError(f"{'; '.join(damaged)}; no intact checkpoint left")
        return None
