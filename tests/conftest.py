"""Shared fixtures and helpers: tiny synthetic data made at test time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evaluation.parser import parse_report
from mammorg.app.cli import main as cli
from mammorg.data.ingest import ingest
from mammorg.io import read_jsonl
from mammorg.preprocess import PreprocessSpec, preprocess_manifest
from mammorg.synth.writer import SynthSettings, synthesise

ROOT = Path(__file__).resolve().parents[1]
TINY_STAGE2 = "stage2/tiny"


def train_stage1(cache_manifest: Path, run_dir: Path, *extra: str) -> int:
    """``mammorg stage1 train`` with the tiny config on a cache manifest; the exit code."""
    return cli(
        [
            "stage1",
            "train",
            "--config",
            "stage1/tiny",
            f"data.cache_manifest={cache_manifest}",
            f"run_dir={run_dir}",
            *extra,
        ]
    )


def ingest_vindr(root: Path, out: Path):
    """The VinDr adapter over a synthetic folder (reports read by the evaluation parser)."""
    return ingest("vindr", root, out, parse_report)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesise(root, SynthSettings(exams=8, seed=3, height=128, width=64), progress=False)
    return root


@pytest.fixture(scope="module")
def stage1_outputs(synth_dir, tmp_path_factory) -> Path:
    """Manifest (two exams with 3 views), preprocessing cache, a 1-epoch stage-1 run and its
    predictions with feature tokens: everything stage 2 reads."""
    root = tmp_path_factory.mktemp("s2")
    ingest_vindr(synth_dir, root / "m.jsonl")
    rows = read_jsonl(root / "m.jsonl")
    rows[0]["views"]["R_MLO"], rows[3]["views"]["L_CC"] = None, None  # exams with 3 views
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess_manifest(root / "m.jsonl", root / "cache", PreprocessSpec(64, 32), workers=1, progress=False)
    assert train_stage1(root / "cache/manifest.jsonl", root / "s1", "train.epochs=1", "model.localise=true") == 0
    assert (
        cli(
            [
                "stage1",
                "predict",
                "--run",
                str(root / "s1"),
                "--manifest",
                str(root / "cache/manifest.jsonl"),
                "--out",
                str(root / "s1/pred.jsonl"),
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def local_decoder(stage1_outputs) -> Path:
    """A small 'pretrained' local model folder (the pretrain recipe) for name_or_path + LoRA."""
    folder = stage1_outputs / "local_llama"
    if not (folder / "config.json").exists():
        assert (
            cli(
                [
                    "stage2",
                    "pretrain",
                    "--config",
                    "stage2/pretrain",
                    f"data.manifest={stage1_outputs / 'm.jsonl'}",
                    "data.split=null",
                    f"out_dir={folder}",
                    "train.epochs=2",
                    "model.hidden_size=64",
                    "model.intermediate_size=128",
                    "model.num_hidden_layers=2",
                    "vocab_size=400",
                ]
            )
            == 0
        )
        log = json.loads((folder / "pretrain_log.json").read_text())
        assert log["epoch_losses"][1] < log["epoch_losses"][0]
    return folder


def stage2_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of the tiny stage-2 config on ``stage1_outputs``; every exam is trained on so
    that 8 synthetic exams give a few batches."""
    return [
        f"data.manifest={root / 'm.jsonl'}",
        f"data.predictions={root / 's1/pred.jsonl'}",
        f"run_dir={run_dir}",
        "data.train_split=train",
        "train.batch_size=2",
        *extra,
    ]


def launch_stage2(
    root: Path, run_dir: Path, local: Path, zero: int, nproc: int, cpu: bool, *extra: str
) -> subprocess.CompletedProcess:
    """``torchrun`` the stage-2 recipe with LoRA on ``local`` under ZeRO-``zero``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + zero),
        "-m",
        "mammorg",
        "stage2",
        "train",
        "--config",
        TINY_STAGE2,
        *stage2_overrides(
            root,
            run_dir,
            f"decoder.name_or_path={local}",
            "lora.enabled=true",
            "train.epochs=1",
            f"deepspeed.config=deepspeed/zero{zero}",
            *extra,
        ),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def assert_complete_lora_run(run_dir: Path) -> None:
    """Saved adapters and extras are complete (non-empty, trained) and reload without DeepSpeed."""
    from stage2_sft.reporter import load_run

    best = run_dir / "checkpoints" / "best"
    adapter = load_file(str(best / "decoder" / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    extras = load_file(str(best / "extras.safetensors"))
    assert all(v.numel() > 0 for v in extras.values())
    _, model, _ = load_run(run_dir)  # reloads with transformers + peft alone
    assert sum(p.numel() for p in model.parameters()) > 0
