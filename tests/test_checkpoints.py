"""Checkpoints meet faults well: a damaged one is named and the previous one used; a full disk
while saving is one line naming the file, and the checkpoint already there survives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ingest_vindr

from mammorg.io import MammorgError
from mammorg.preprocess import PreprocessSpec, preprocess_manifest
from mammorg.training.backends import TorchBackend
from mammorg.training.checkpoint import CheckpointStore, checkpoint_meta, damage, load_tensors, save_tensors
from mammorg.training.recipe import EpochRecipe
from mammorg.training.settings import TrainSettings


def _writer(value: float):
    def write(folder: Path) -> None:
        save_tensors({"w": torch.full((1000,), value)}, folder / "model.safetensors")

    return write


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_last_falls_back_to_previous_and_says_so(tmp_path, capsys):
    store = CheckpointStore(tmp_path)
    for epoch in range(3):
        store.save("last", _writer(float(epoch)), {"epoch": epoch})
    assert checkpoint_meta(store.path("last"))["epoch"] == 2 and checkpoint_meta(store.path("previous"))["epoch"] == 1
    assert store.resumable() == store.path("last")
    _truncate(store.path("last") / "model.safetensors")
    assert "truncated" in str(damage(store.path("last")))
    capsys.readouterr()
    assert store.resumable() == store.path("previous")
    err = capsys.readouterr().err
    assert "is damaged (model.safetensors truncated" in err and "resuming from" in err and err.count("\n") == 1
    assert load_tensors(store.path("previous") / "model.safetensors")["w"][0] == 1.0
    (store.path("previous") / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MammorgError, match="no intact checkpoint left"):
        store.resumable()


def test_a_damaged_weights_file_is_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors({"w": torch.ones(10)}, path)
    _truncate(path)
    with pytest.raises(MammorgError, match=r"w.safetensors: damaged or unreadable weights"):
        load_tensors(path)


@pytest.fixture(scope="module")
def cache_manifest(synth_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    ingest_vindr(synth_dir, root / "m.jsonl")
    preprocess_manifest(root / "m.jsonl", root / "cache", PreprocessSpec(64, 32), workers=1, progress=False)
    return root / "cache" / "manifest.jsonl"


def _train(cache_manifest: Path, run_dir: Path, *extra: str, file_limit: int | None = None):
    cmd = [
        sys.executable,
        "-m",
        "mammorg",
        "stage1",
        "train",
        "--config",
        "stage1/tiny",
        f"data.cache_manifest={cache_manifest}",
        "data.val_split=train",
        f"run_dir={run_dir}",
        "train.epochs=3",
        *extra,
    ]
    if file_limit is not None:  # a "full disk": writes past the limit fail with EFBIG
        cmd = [
            sys.executable,
            "-c",
            "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit}, {file_limit})); "
            "sys.argv = ['mammorg', *sys.argv[1:]]; runpy.run_module('mammorg', run_name='__main__')",
            *cmd[3:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_resumes_past_a_truncated_checkpoint(cache_manifest, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(cache_manifest, run_dir, "train.stop_after_epochs=2").returncode == 0
    weights = run_dir / "checkpoints" / "last" / "model.safetensors"
    _truncate(weights)
    proc = _train(cache_manifest, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint {run_dir / 'checkpoints' / 'last'} is damaged (model.safetensors truncated" in proc.stderr
    assert "resuming from" in proc.stderr and "resumed from" in proc.stderr and "at epoch 1" in proc.stderr
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        1,
        2,
    ]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(cache_manifest, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(cache_manifest, run_dir, "train.stop_after_epochs=1").returncode == 0
    last = run_dir / "checkpoints" / "last"
    before = (last / "model.safetensors").read_bytes()
    proc = _train(cache_manifest, run_dir, file_limit=200_000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("mammorg: error:")]
    assert len(error) == 1 and "cannot write" in error[0] and "kept as it was" in error[0]
    assert ".safetensors" in error[0] or "training_state" in error[0]  # the file is named
    assert damage(last) is None and (last / "model.safetensors").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert checkpoint_meta(last)["epoch"] == 0


class _OneRankGroupRecipe(EpochRecipe):
    """Joins a one-rank gloo group in ``setup`` as ``init_distributed`` does under torchrun."""

    def __init__(self, run_dir: Path, fail_in_setup: bool):
        super().__init__(run_dir, TrainSettings(epochs=1))
        self.fail_in_setup = fail_in_setup

    def setup(self) -> None:
        store = dist.FileStore(str(self.run_dir.parent / f"store_{self.fail_in_setup}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        if self.fail_in_setup:
            raise MammorgError("setup failed")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.backend = TorchBackend(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), 1, 1.0)

    def train_epoch(self, epoch: int) -> float:
        return 0.0

    def validate(self, epoch: int, train_loss: float) -> tuple[float | None, dict]:
        return None, {}

    def write_weights(self, folder: Path) -> None:
        save_tensors(dict(self.backend.module.state_dict()), folder / "model.safetensors")


@pytest.mark.parametrize("fail_in_setup", [False, True])
def test_a_recipe_leaves_its_process_group_when_it_ends(tmp_path, fail_in_setup):
    """A rank that leaves the group to interpreter shutdown can abort after its work is saved
    ("terminate called without an active exception" from gloo's threads): the skeleton leaves it,
    after a finished run and after a failed one."""
    recipe = _OneRankGroupRecipe(tmp_path / "run", fail_in_setup)
    if fail_in_setup:
        with pytest.raises(MammorgError, match="setup failed"):
            recipe.run()
    else:
        recipe.run()
        assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").exists()
    assert not dist.is_initialized()
