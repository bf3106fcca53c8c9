"""Stage-2 samples: prompt (view markers, visual placeholders, knowledge) + report, and batching."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from evaluation.parser import parse_report
from mammorg.io import MammorgError, read_jsonl
from mammorg.labels import VIEWS
from stage2_sft.knowledge import (HEAD_KEYS, SOFT_SLOTS, discrete_tokens, plan_tokens,
                                  state_from_labels, state_from_prediction, with_gold_heads)
from stage2_sft.model import IMAGE, KNOWLEDGE, MISSING, REPORT, VIEW_MARKERS
from terminology.normalize import Normalizer


@dataclass
class PromptBuilder:
    """Token ids of the prompt and of the target report for one exam."""

    tokenizer: PreTrainedTokenizerBase
    visual_tokens_per_view: int
    knowledge_mode: str = "discrete"
    visual: bool = True
    max_report_tokens: int = 256
    normalizer: Normalizer | None = None
    confidence: bool = True  # discrete knowledge with confidence-bucket tokens
    plan: bool = False  # the target starts with the report's assessment plan (``plan_tokens``)

    def prompt_ids(self, view_mask: list[bool], state: dict | None) -> list[int]:
        tok = self.tokenizer
        pieces: list[str] = []
        if self.visual:
            for marker, present in zip(VIEW_MARKERS, view_mask):
                pieces += [marker] + ([IMAGE] * self.visual_tokens_per_view if present else [MISSING])
        if self.knowledge_mode in ("discrete", "both"):
            pieces += discrete_tokens(state, self.confidence)
        if self.knowledge_mode in ("soft", "both"):
            pieces += [KNOWLEDGE] * SOFT_SLOTS
        ids = tok.convert_tokens_to_ids(pieces + [REPORT])
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids

    def report_ids(self, text: str) -> list[int]:
        """Target ids: with ``plan``, the assessment plan first (the categories the report states,
        decided before it is worded; special tokens, so decoding drops them), then the report."""
        plan = self.tokenizer.convert_tokens_to_ids(plan_tokens(parse_report(text)["birads"])) \
            if self.plan else []
        text = self.normalizer(text) if self.normalizer else text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_report_tokens]
        return plan + ids + [self.tokenizer.eos_token_id]


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else base / p


class ReportDataset(Dataset):
    """Exams of a manifest joined with stage-1 predictions (knowledge source + feature tokens)."""

    def __init__(self, manifest: str | Path, predictions: str | Path, builder: PromptBuilder,
                 split: str | None = None, source: str = "predicted", with_reports: bool = True,
                 gold_fraction: float = 0.0, seed: int = 0, gold_heads: tuple[str, ...] = tuple(HEAD_KEYS)):
        rows = [r for r in read_jsonl(manifest) if split is None or r.get("split") == split]
        preds_path = Path(predictions)
        preds = {p["exam_id"]: p for p in read_jsonl(preds_path)}
        missing = [r["exam_id"] for r in rows if r["exam_id"] not in preds]
        if missing:
            raise MammorgError(f"{preds_path}: no stage-1 prediction for {len(missing)} exam(s) "
                               f"of {manifest}, e.g. {missing[0]}")
        if with_reports:
            rows = [r for r in rows if r.get("report")]
        self.rows, self.preds, self.pred_dir = rows, preds, preds_path.parent
        self.builder, self.source, self.with_reports = builder, source, with_reports
        self.gold_fraction, self.seed, self.epoch = gold_fraction, seed, 0
        self.gold_heads = tuple(gold_heads)
        self._report_ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def report_ids(self, i: int) -> list[int]:
        """Tokenised target report of exam ``i``, computed once (not every epoch)."""
        if i not in self._report_ids:
            self._report_ids[i] = self.builder.report_ids(self.rows[i]["report"])
        return self._report_ids[i]

    def uses_gold(self, i: int) -> bool:
        """Knowledge of exam ``i`` from its labels: the oracle source, or a ``gold_fraction`` draw
        (deterministic per seed, epoch and exam, so a resumed run sees the same draws)."""
        if self.source == "gold":
            return True
        return self.gold_fraction > 0 and \
            np.random.default_rng([self.seed, self.epoch, i]).random() < self.gold_fraction

    def knowledge(self, i: int) -> dict[str, torch.Tensor]:
        """Stage 1's predicted state of exam ``i``, or, on a gold draw, its labels for the heads in
        ``gold_heads`` (all heads by default; the others stay predicted)."""
        row = self.rows[i]
        if not self.uses_gold(i):
            return state_from_prediction(self.preds[row["exam_id"]])
        gold = state_from_labels(row.get("labels") or {}, row.get("views") or {})
        if set(self.gold_heads) == set(HEAD_KEYS):
            return gold
        return with_gold_heads(state_from_prediction(self.preds[row["exam_id"]]), gold, self.gold_heads)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        pred = self.preds[row["exam_id"]]
        feats = load_file(str(_resolve(self.pred_dir, pred["features"])))
        view_mask = feats["view_mask"].bool()
        state = self.knowledge(i)
        prompt = self.builder.prompt_ids(view_mask.tolist(), state)
        report = self.report_ids(i) if self.with_reports else []
        sample = {"exam_id": row["exam_id"], "prompt": prompt, "report": report, "knowledge": state,
                  "views": [v for v, m in zip(VIEWS, view_mask.tolist()) if m]}
        if self.builder.visual:
            sample["visual"] = feats["tokens"][view_mask].float()
        return sample

    def lengths(self) -> list[int]:
        """Sequence lengths for length-grouped batching, without loading features: the exact
        (normalised, truncated, cached) report length plus an upper bound of the prompt length."""
        prompt = 4 * (1 + self.builder.visual_tokens_per_view) + SOFT_SLOTS + 24
        return [prompt + len(self.report_ids(i)) for i in range(len(self.rows))]


def collate(samples: list[dict], pad_id: int, for_generation: bool = False) -> dict:
    """Training: right-padded prompt+report with labels only on the report. Generation: left-padded
    prompts. Visual tokens are packed ``[sum of views, N, D]`` in prompt order."""
    seqs = [s["prompt"] if for_generation else s["prompt"] + s["report"] for s in samples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        span = slice(width - len(seq), width) if for_generation else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq)
        attn[i, span] = 1
        if not for_generation:
            labels[i, len(s["prompt"]):len(seq)] = torch.tensor(s["report"])
    out = {"input_ids": ids, "attention_mask": attn, "exam_id": [s["exam_id"] for s in samples],
           "knowledge": {k: torch.stack([s["knowledge"][k] for s in samples])
                         for k in samples[0]["knowledge"]}}
    if not for_generation:
        out["labels"] = labels
    if "visual" in samples[0]:
        out["visual"] = torch.cat([s["visual"] for s in samples])
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           rank: int = 0, world: int = 1, mega: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths; every rank gets the same number of batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * mega):
        chunk = sorted(order[start:start + batch_size * mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    per_rank = len(batches) // world if world > 1 else len(batches)
    if per_rank == 0:
        raise MammorgError(f"{len(lengths)} training exams give fewer batches than {world} ranks")
    return batches[rank::world][:per_rank]
