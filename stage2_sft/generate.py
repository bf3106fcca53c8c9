"""Recipe: ``mammorg stage2 generate --run RUN --manifest M --out GEN.jsonl``.

Batched greedy or beam search (KV cache) over the exams of a manifest; each output line holds
``id``, ``text`` and the parsed ``structured`` report (DESIGN.md §5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import LogitsProcessorList

from evaluation.parser import parse_report
from mammorg.config import load_config
from mammorg.io import MammorgError, write_jsonl_atomic
from stage2_sft.assembly import gold_heads, load_generator, make_builder
from stage2_sft.constrained import AssessmentTokens, assessment_processor, assessment_tokens
from stage2_sft.data import ReportDataset, collate
from stage2_sft.model import ReportGenerator


def load_run(run_dir: str | Path, which: str = "best"):
    """(config, generator, tokenizer) of a stage-2 run (``best``, else ``last``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise MammorgError(f"{run_dir}: not a stage-2 run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    for name in (which, "last"):
        folder = run_dir / "checkpoints" / name
        if (folder / "extras.safetensors").exists():
            model, tok = load_generator(folder, cfg, cfg.visual.dim, shared=run_dir)
            return cfg, model, tok
    raise MammorgError(f"{run_dir}: no checkpoint (train first)")


def generation_kwargs(cfg: DictConfig, tok, num_beams: int | None = None,
                      device: torch.device | None = None) -> dict:
    """``generate`` arguments of a config. ``generate.cache``: ``static`` preallocates the KV cache
    so that transformers compiles the decoding step; ``auto`` picks it on a GPU."""
    gen = cfg.generate
    kwargs = {"max_new_tokens": gen.max_new_tokens, "num_beams": num_beams or gen.num_beams,
              "do_sample": False, "repetition_penalty": gen.repetition_penalty,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if gen.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
    cache = gen.get("cache", "auto")
    if cache not in ("auto", "static", "dynamic"):
        raise MammorgError(f"generate.cache={cache!r}: expected auto, static or dynamic")
    if cache == "static" or (cache == "auto" and device is not None and device.type == "cuda"):
        kwargs["cache_implementation"] = "static"
    return kwargs


def with_assessment(kwargs: dict, assessment: str, tokens: AssessmentTokens | None,
                    birads_label: torch.Tensor) -> dict:
    """``kwargs`` plus the processor of ``generate.assessment`` (``stage1``: the report states
    stage 1's decisions ``birads_label [N, 2]``; ``plan``: those of the decoder's own plan)."""
    processor = assessment_processor(assessment, tokens, birads_label)
    if processor is None:
        return kwargs
    return {**kwargs, "logits_processor": LogitsProcessorList([processor])}


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def generate_reports(model: ReportGenerator, tok, ds: ReportDataset, kwargs: dict,
                     batch_size: int = 8, progress: bool = True, assessment: str = "free") -> list[dict]:
    """Reports for every exam of ``ds``; ``assessment`` (``generate.assessment``) can hold the
    stated BI-RADS categories to stage 1's decisions or to the decoder's plan
    (``stage2_sft.constrained``)."""
    tokens = assessment_tokens(assessment, tok, ds.builder.plan)
    device = next(model.parameters()).device
    rows = []
    for start in tqdm(range(0, len(ds), batch_size), desc="stage2 generate", disable=not progress,
                      leave=False):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))],
                        tok.pad_token_id, for_generation=True)
        visual = batch.get("visual")
        step_kwargs = with_assessment(kwargs, assessment, tokens, batch["knowledge"]["birads_label"])
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             None if visual is None else visual.to(device),
                             {k: v.to(device) for k, v in batch["knowledge"].items()}, **step_kwargs)
        for exam_id, ids in zip(batch["exam_id"], out):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            rows.append({"id": exam_id, "text": text, "structured": parse_report(text)})
    return rows


def main(args: argparse.Namespace) -> None:
    cfg, model, tok = load_run(args.run)
    device = inference_device()
    model.to(device)
    predictions = args.predictions or cfg.data.predictions
    ds = ReportDataset(args.manifest, predictions, make_builder(cfg, tok), args.split,
                       cfg.knowledge.source, with_reports=False, gold_heads=gold_heads(cfg))
    if len(ds) == 0:
        raise MammorgError(f"{args.manifest}: no exams to report" + (f" in split '{args.split}'"
                                                                      if args.split else ""))
    bs = args.batch_size or cfg.generate.batch_size
    rows = generate_reports(model, tok, ds, generation_kwargs(cfg, tok, args.num_beams, device), bs,
                            assessment=cfg.generate.get("assessment", "free"))
    write_jsonl_atomic(args.out, rows)
    print(json.dumps({"generated": len(rows), "out": str(args.out)}))
