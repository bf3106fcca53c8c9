"""The one reporter: prepared samples in, narrative and structured reports out.

``stage2 generate`` (a run over a manifest), ``mammorg report`` and the reporting service (a
bundle over new exams) and the export's model card all generate through ``Reporter``: batching,
greedy or beam search with the KV cache, the ``generate.assessment``, ``generate.management``
and ``generate.findings`` constraints, decoding
without special tokens, and parsing into a ``StructuredReport``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from evaluation.parser import parse_report
from mammorg.io import MammorgError, read_jsonl
from mammorg.schema import StructuredReport
from mammorg.training.recipe import trained_run
from stage2_sft.assembly import lexicon_of, make_builder
from stage2_sft.config import GenerateSettings, Stage2Config
from stage2_sft.constrained import (
    AssessmentTokens,
    CategoryByDeadline,
    CategoryNames,
    ConsistentManagement,
    GenerationRules,
    StatedAssessment,
    assessment_processor,
    assessment_tokens,
)
from stage2_sft.data import PromptBuilder, Sample, collate
from stage2_sft.model import ReportGenerator
from stage2_sft.stated_findings import FindingTokens, PlannedFindings, StatedFindings
from terminology.lexicon import Lexicon
from terminology.normalize import sentence_case


@dataclass
class GeneratedReport:
    exam_id: str
    text: str
    structured: StructuredReport

    def to_json(self) -> dict[str, Any]:
        return {"id": self.exam_id, "text": self.text, "structured": self.structured.to_json()}

    @classmethod
    def read(cls, path: str | Path) -> list[GeneratedReport]:
        """The lines of a ``stage2 generate`` output."""
        return [cls(r["id"], r["text"], StructuredReport.from_json(r["structured"])) for r in read_jsonl(path)]


def generation_kwargs(
    gen: GenerateSettings, tok: PreTrainedTokenizerBase, device: torch.device, num_beams: int | None = None
) -> dict[str, Any]:
    """``generate`` arguments. ``generate.cache``: ``static`` preallocates the KV cache so that
    transformers compiles the decoding step; ``auto`` picks it on a GPU."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": num_beams or gen.num_beams,
        "do_sample": False,
        "repetition_penalty": gen.repetition_penalty,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if gen.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
    if gen.cache == "static" or (gen.cache == "auto" and device.type == "cuda"):
        kwargs["cache_implementation"] = "static"
    return kwargs


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(run_dir: str | Path, which: str = "best") -> tuple[Stage2Config, ReportGenerator, PreTrainedTokenizerBase]:
    """(config, generator, tokenizer) of a stage-2 run (``best``, else the newest intact checkpoint)."""
    cfg, folder = trained_run(run_dir, Stage2Config, "stage-2", which)
    model, tok = ReportGenerator.from_pretrained(folder, shared=run_dir)
    return cfg, model, tok


class SampleSource(Protocol):
    """Samples by index: a list, or a ``ReportDataset`` (loaded lazily, batch by batch)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...


class Reporter:
    """Generation settings bound to a generator, its tokenizer and its prompt builder."""

    def __init__(
        self,
        generator: ReportGenerator,
        tokenizer: PreTrainedTokenizerBase,
        builder: PromptBuilder,
        settings: GenerateSettings,
        device: torch.device | None = None,
        lexicon: Lexicon | None = None,
        normalized: bool = True,
    ):
        """``lexicon``: the run's terms (the findings constraint needs their finding labels);
        ``normalized``: the decoder learnt normalised report text (``terminology.normalize``)."""
        self.generator, self.tokenizer, self.builder, self.settings = generator, tokenizer, builder, settings
        self.device = device or next(generator.parameters()).device
        self.generator.to(self.device)
        self._tokens: dict[str, AssessmentTokens | None] = {}
        consistent = settings.management == "consistent"
        self._management = ConsistentManagement(tokenizer, normalized) if consistent else None
        self._names = CategoryNames(tokenizer) if consistent else None  # a category's name is its own
        self.lexicon = lexicon
        self._findings = None
        if settings.findings == "stage1":
            if lexicon is None:
                raise MammorgError("generate.findings=stage1 needs the run's lexicon (Reporter.from_config passes it)")
            self._findings = FindingTokens.of(tokenizer, lexicon)

    @classmethod
    def from_config(
        cls,
        cfg: Stage2Config,
        generator: ReportGenerator,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device | None = None,
    ) -> Reporter:
        builder = make_builder(cfg, tokenizer)
        lexicon = lexicon_of(cfg.terminology)
        return cls(generator, tokenizer, builder, cfg.generate, device, lexicon, cfg.terminology.normalize)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | None = None) -> tuple[Stage2Config, Reporter]:
        cfg, model, tok = load_run(run_dir)
        return cfg, cls.from_config(cfg, model, tok, device or inference_device())

    def generation_kwargs(self, num_beams: int | None = None) -> dict[str, Any]:
        return generation_kwargs(self.settings, self.tokenizer, self.device, num_beams)

    def assessment_tokens(self, assessment: str) -> AssessmentTokens | None:
        """The token ids an assessment constraint needs (None for ``free``), looked up once."""
        if assessment not in self._tokens:
            self._tokens[assessment] = assessment_tokens(assessment, self.tokenizer, self.builder.plan, self.lexicon)
        return self._tokens[assessment]

    def planned_findings(self, tokens: AssessmentTokens | None, decided: torch.Tensor) -> PlannedFindings | None:
        """The processor that writes stage 1's findings into the plan (runs trained with
        ``data.findings_plan``; None otherwise)."""
        if not self.builder.findings_plan:
            return None
        tokens = tokens or AssessmentTokens.of(self.tokenizer, self.lexicon)
        if tokens.plan_findings is None or tokens.brackets is None:
            return None
        return PlannedFindings(tokens.plan_findings, tokens.brackets, decided)

    @torch.no_grad()
    def generate(
        self,
        samples: SampleSource,
        batch_size: int | None = None,
        num_beams: int | None = None,
        assessment: str | None = None,
        progress: bool = False,
        extra_processors: Sequence[Any] = (),
    ) -> list[GeneratedReport]:
        """Reports for ``samples`` in order. ``assessment`` (default ``generate.assessment``) can
        hold the stated BI-RADS categories to stage 1's decisions or to the decoder's plan."""
        assessment = assessment or self.settings.assessment
        tokens = self.assessment_tokens(assessment)
        kwargs = self.generation_kwargs(num_beams)
        size = batch_size or self.settings.batch_size
        out: list[GeneratedReport] = []
        for start in tqdm(range(0, len(samples), size), desc="stage2 generate", disable=not progress, leave=False):
            chunk = [samples[i] for i in range(start, min(start + size, len(samples)))]  # a Dataset too
            batch = collate(chunk, self.tokenizer.pad_token_id, for_generation=True)
            batch = batch.to(self.device)
            processors = list(extra_processors)
            if self._management is not None:
                processors.append(self._management)
            processor = assessment_processor(assessment, tokens, batch.knowledge.birads_label, batch.knowledge.density)
            if processor is not None:
                processors.append(processor)
            if self._names is not None:
                processors.append(self._names)
            if self._findings is not None:
                known = batch.knowledge
                where = torch.stack([known.location, known.clock, known.depth], -1)  # [N, 2, 7, 3]
                located = where if self.settings.locations == "stage1" else None
                processors.append(StatedFindings(self._findings, known.finding_on, where=located))
                planned = self.planned_findings(tokens, batch.knowledge.finding_on)
                if planned is not None:
                    processors.append(planned)
            if isinstance(processor, StatedAssessment):  # last: no other rule overrides it
                processors.append(CategoryByDeadline(processor, kwargs["max_new_tokens"]))
            step = (
                {**kwargs, "logits_processor": LogitsProcessorList([GenerationRules(processors)])}
                if processors
                else kwargs
            )
            ids = self.generator.generate(batch.input_ids, batch.attention_mask, batch.visual, batch.knowledge, **step)
            for exam_id, row in zip(batch.exam_ids, ids):
                text = sentence_case(str(self.tokenizer.decode(row, skip_special_tokens=True)).strip())
                out.append(GeneratedReport(exam_id, text, parse_report(text)))
        return out
