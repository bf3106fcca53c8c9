"""Stage-2 samples: prompt (view markers, visual placeholders, knowledge) + report, and batching."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from evaluation.parser import parse_report
from mammorg.io import MammorgError
from mammorg.labels import VIEWS
from mammorg.schema import Exam, Stage1Prediction, read_manifest, read_predictions
from mammorg.training.checkpoint import load_tensors
from stage2_sft.config import KNOWLEDGE_HEADS
from stage2_sft.knowledge import SOFT_SLOTS, KnowledgeState, KnowledgeVocabulary
from stage2_sft.model import IMAGE, KNOWLEDGE, MISSING, REPORT, VIEW_MARKERS
from terminology.normalize import Normalizer


@dataclass
class Sample:
    """One exam ready for the decoder: prompt ids, target ids (training), knowledge state and the
    visual tokens of its present views ``[V, N, D]`` in prompt order (None without visual tokens)."""

    exam_id: str
    prompt: list[int]
    report: list[int]
    knowledge: KnowledgeState
    views: list[str]
    visual: torch.Tensor | None = None


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
    locations: bool = True  # discrete knowledge with the quadrant of each localised finding
    chat: tuple[list[int], list[int]] | None = None  # chat-template ids around the prompt
    findings_plan: bool = False  # the plan also names the findings the report states

    def prompt_ids(self, view_mask: list[bool], state: KnowledgeState) -> list[int]:
        tok = self.tokenizer
        pieces: list[str] = []
        if self.visual:
            for marker, present in zip(VIEW_MARKERS, view_mask):
                pieces += [marker] + ([IMAGE] * self.visual_tokens_per_view if present else [MISSING])
        if self.knowledge_mode in ("discrete", "both"):
            pieces += state.tokens(self.confidence, self.locations)
        if self.knowledge_mode in ("soft", "both"):
            pieces += [KNOWLEDGE] * SOFT_SLOTS
        ids: list[int] = list(tok.convert_tokens_to_ids([*pieces, REPORT]))  # type: ignore[arg-type]
        if self.chat is not None:  # the template brings its own bos
            before, after = self.chat
            return [*before, *ids, *after]
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids

    def report_ids(self, text: str) -> list[int]:
        """Target ids: with ``plan``, the assessment plan first (the categories the report states,
        and with ``findings_plan`` its findings, decided before it is worded; special tokens, so
        decoding drops them), then the report."""
        plan: list[int] = []
        if self.plan:
            parsed = parse_report(text)
            findings = parsed.positives() if self.findings_plan else None
            plan = self.tokenizer.convert_tokens_to_ids(KnowledgeVocabulary.plan(parsed.birads, findings))  # type: ignore[assignment]
        text = self.normalizer(text) if self.normalizer else text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_report_tokens]
        return plan + ids + [self.tokenizer.eos_token_id]

    def sample(
        self,
        exam_id: str,
        tokens: torch.Tensor,
        view_mask: torch.Tensor,
        state: KnowledgeState,
        report: list[int] | None = None,
    ) -> Sample:
        """A sample from stage 1's feature tokens ``[4, N, D]`` (zero for missing views), the view
        mask ``[4]`` and the knowledge state; the one path for training, generation and bundles."""
        mask = view_mask.bool()
        return Sample(
            exam_id,
            self.prompt_ids(mask.tolist(), state),
            report or [],
            state,
            [v for v, m in zip(VIEWS, mask.tolist()) if m],
            tokens[mask].float() if self.visual else None,
        )


def read_features(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``[4, N, D]``, view mask ``[4]``) of a stage-1 feature file."""
    feats = load_tensors(path)
    return feats["tokens"], feats["view_mask"].bool()


def resolve_path(base: Path, rel: str) -> Path:
    """``rel`` against ``base`` unless absolute."""
    p = Path(rel)
    return p if p.is_absolute() else base / p


class ReportDataset(Dataset):
    """Exams of a manifest joined with stage-1 predictions (knowledge source + feature tokens)."""

    def __init__(
        self,
        manifest: str | Path,
        predictions: str | Path,
        builder: PromptBuilder | None,
        split: str | None = None,
        source: str = "predicted",
        with_reports: bool = True,
        gold_fraction: float = 0.0,
        seed: int = 0,
        gold_heads: tuple[str, ...] = KNOWLEDGE_HEADS,
        visual_drop: float = 0.0,
    ):
        rows = [r for r in read_manifest(manifest) if split is None or r.split == split]
        preds_path = Path(predictions)
        preds = {p.exam_id: p for p in read_predictions(preds_path)}
        missing = [r.exam_id for r in rows if r.exam_id not in preds]
        if missing:
            raise MammorgError(
                f"{preds_path}: no stage-1 prediction for {len(missing)} exam(s) of {manifest}, e.g. {missing[0]}"
            )
        if with_reports:
            rows = [r for r in rows if r.report]
        self.rows: list[Exam] = rows
        self.preds: dict[str, Stage1Prediction] = preds
        self.pred_dir = preds_path.parent
        self.builder, self.source, self.with_reports = builder, source, with_reports
        self.gold_fraction, self.seed, self.epoch = gold_fraction, seed, 0
        self.gold_heads = tuple(gold_heads)
        self.visual_drop = visual_drop
        self._report_ids: dict[int, list[int]] = {}
        self._locations: dict[int, list[dict]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> PromptBuilder:
        if self.builder is None:
            raise MammorgError("this dataset was made without a prompt builder")
        return self.builder

    def report_ids(self, i: int) -> list[int]:
        """Tokenised target report of exam ``i``, computed once (not every epoch)."""
        if i not in self._report_ids:
            self._report_ids[i] = self.prompts.report_ids(str(self.rows[i].report))
        return self._report_ids[i]

    def report_locations(self, i: int) -> list[dict]:
        """Finding locations the reference report states (parsed once): the gold locations."""
        if i not in self._locations:
            report = self.rows[i].report
            self._locations[i] = parse_report(report).locations if report else []
        return self._locations[i]

    def uses_gold(self, i: int) -> bool:
        """Knowledge of exam ``i`` from its labels: the oracle source, or a ``gold_fraction`` draw
        (deterministic per seed, epoch and exam, so a resumed run sees the same draws)."""
        if self.source == "gold":
            return True
        return (
            self.gold_fraction > 0 and np.random.default_rng([self.seed, self.epoch, i]).random() < self.gold_fraction
        )

    def knowledge(self, i: int) -> KnowledgeState:
        """Stage 1's predicted state of exam ``i``, or, on a gold draw, its labels for the heads in
        ``gold_heads`` (all heads by default; the others stay predicted)."""
        row = self.rows[i]
        if not self.uses_gold(i):
            return KnowledgeState.from_prediction(self.preds[row.exam_id])
        gold = KnowledgeState.from_labels(row.labels, row.views, self.report_locations(i))
        if set(self.gold_heads) == set(KNOWLEDGE_HEADS):
            return gold
        return KnowledgeState.from_prediction(self.preds[row.exam_id]).with_heads_from(gold, self.gold_heads)

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        pred = self.preds[row.exam_id]
        if pred.features is None:
            raise MammorgError(f"{self.pred_dir}: no feature tokens for {row.exam_id} (stage1 predict writes them)")
        tokens, view_mask = read_features(resolve_path(self.pred_dir, pred.features))
        report = self.report_ids(i) if self.with_reports else []
        if self.visual_drop and np.random.default_rng([self.seed, self.epoch, i, 1]).random() < self.visual_drop:
            view_mask = torch.zeros_like(view_mask)  # this epoch, the exam is seen without visual tokens
        return self.prompts.sample(row.exam_id, tokens, view_mask, self.knowledge(i), report)

    def lengths(self) -> list[int]:
        """Sequence lengths for length-grouped batching, without loading features: the exact
        (normalised, truncated, cached) report length plus an upper bound of the prompt length."""
        prompt = 4 * (1 + self.prompts.visual_tokens_per_view) + SOFT_SLOTS + 24
        return [prompt + len(self.report_ids(i)) for i in range(len(self.rows))]


@dataclass
class Batch:
    """Padded ids (training: prompt + report, right-padded, labels on the report; generation:
    prompts, left-padded), the stacked knowledge states and the packed visual tokens
    ``[sum of views, N, D]`` in prompt order."""

    exam_ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    knowledge: KnowledgeState
    labels: torch.Tensor | None = None
    visual: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.exam_ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.knowledge.to(device),
            None if self.labels is None else self.labels.to(device),
            None if self.visual is None else self.visual.to(device),
        )


def collate(samples: list[Sample], pad_id: int, for_generation: bool = False) -> Batch:
    """A batch of samples (see ``Batch``)."""
    seqs = [s.prompt if for_generation else s.prompt + s.report for s in samples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        span = slice(width - len(seq), width) if for_generation else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq)
        attn[i, span] = 1
        if not for_generation:
            labels[i, len(s.prompt) : len(seq)] = torch.tensor(s.report)
    visual = [s.visual for s in samples if s.visual is not None]
    return Batch(
        [s.exam_id for s in samples],
        ids,
        attn,
        KnowledgeState.stack([s.knowledge for s in samples]),
        None if for_generation else labels,
        torch.cat(visual) if visual else None,
    )


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, mega: int = 16
) -> list[list[int]]:
    """Shuffled batches of similar lengths; every rank gets the same number of batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * mega):
        chunk = sorted(order[start : start + batch_size * mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    per_rank = len(batches) // world if world > 1 else len(batches)
    if per_rank == 0:
        raise MammorgError(f"{len(lengths)} training exams give fewer batches than {world} ranks")
    return batches[rank::world][:per_rank]
