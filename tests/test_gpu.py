"""CUDA checks: bf16 training of both stages, compiled decoder blocks, DeepSpeed ZeRO on one GPU.

Skipped without a CUDA device (CI); run with ``pytest -m gpu`` on a GPU machine. The fixtures
train stage 1 on the GPU as well, so its bf16 path is exercised here too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_STAGE2 as TINY
from conftest import assert_complete_lora_run, launch_stage2, stage2_overrides

from mammorg.config import load_config as load_typed
from stage2_sft.assembly import make_builder
from stage2_sft.config import Stage2Config
from stage2_sft.data import ReportDataset
from stage2_sft.reporter import Reporter, load_run
from stage2_sft.train import train as run


def load_config(ref, overrides=()):
    return load_typed(ref, Stage2Config, overrides)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _column(path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in path.read_text().splitlines() if key in line]


def test_both_stages_train_in_bf16_and_generate_on_cuda(stage1_outputs, tmp_path):
    root = stage1_outputs
    s1_losses = _column(root / "s1" / "metrics.jsonl", "train_loss")
    assert s1_losses and all(math.isfinite(x) for x in s1_losses)
    run(
        load_config(
            TINY,
            stage2_overrides(root, tmp_path, "train.epochs=3", "train.compile=true", "knowledge.mode=both"),
        )
    )
    losses = _column(tmp_path / "metrics.jsonl", "train_loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    cfg, model, tok = load_run(tmp_path)
    reporter = Reporter.from_config(cfg, model, tok, torch.device("cuda"))
    ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", make_builder(cfg, tok), with_reports=False)
    kwargs = reporter.generation_kwargs(num_beams=2)  # static cache
    assert kwargs["cache_implementation"] == "static"
    rows = [r.to_json() for r in reporter.generate(ds, 4, num_beams=2)]
    assert len(rows) == len(ds) and all(isinstance(r["text"], str) for r in rows)
    stated = reporter.generate(ds, 4, num_beams=2, assessment="stage1")  # on CUDA tensors
    assert len(stated) == len(ds)


def test_bf16_compiled_report_loss_matches_fp32_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage2_sft.assembly import compile_decoder
    from stage2_sft.model import ReportGenerator, SpecialIds

    torch.manual_seed(0)
    decoder = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).cuda()
    gen = ReportGenerator(decoder, SpecialIds(3, 4, 5), visual_dim=32, knowledge_mode="none").cuda()
    ids = torch.randint(10, 512, (4, 96), device="cuda")
    ids[:, 1:33] = 3
    labels = ids.clone()
    labels[:, :34] = -100
    mask, visual = torch.ones_like(ids), torch.randn(16, 8, 32, device="cuda")  # 4 views x 8
    reference = gen(ids, mask, labels, visual).item()
    compile_decoder(gen.decoder)
    for _ in range(2):  # compilation, then the compiled graph
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gen(ids, mask, labels, visual)
        loss.backward()
    assert abs(loss.item() - reference) / reference < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_bf16_lora_on_one_gpu_saves_complete_adapters(stage1_outputs, local_decoder, tmp_path, zero):
    proc = launch_stage2(stage1_outputs, tmp_path, local_decoder, zero, nproc=1, cpu=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_lora_run(tmp_path)


def test_lora_on_a_bf16_base_trains_and_saves_fp32_adapters(stage1_outputs, local_decoder, tmp_path):
    from conftest import ROOT

    run(
        load_config(
            str(ROOT / "configs/stage2/lora.yaml"),
            stage2_overrides(
                stage1_outputs,
                tmp_path,
                f"decoder.name_or_path={local_decoder}",
                "decoder.dtype=bfloat16",
                "train.epochs=2",
                "train.compile=true",
            ),
        )
    )
    losses = _column(tmp_path / "metrics.jsonl", "train_loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert_complete_lora_run(tmp_path)
