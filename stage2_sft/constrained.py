"""Constrained generation: the report states stage 1's BI-RADS categories (``generate.assessment``).

With ``assessment: stage1`` the decoder still chooses where a category goes and words the report
freely, but whenever it writes a BI-RADS category term (an atomic token such as ``BI-RADS 4B``)
the term is the one stage 1 decided for that breast: for the last side named in the sentence
(``Right``/``Left``), else the exam's most severe category. Its score is the best category
score, so the choice to state a category at that point is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, birads_severity

ASSESSMENTS = ("free", "stage1")
SIDE_WORDS = {0: ("Left", "ĠLeft", "left", "Ġleft"), 1: ("Right", "ĠRight", "right", "Ġright")}
SENTENCE_ENDS = (".", "Ċ", "ĊĊ", ":")


def _ids(vocab: dict[str, int], tokens) -> torch.Tensor:
    return torch.tensor([vocab[t] for t in tokens if t in vocab])


@dataclass(frozen=True)
class AssessmentTokens:
    """Token ids the processor needs: BI-RADS category terms, side words, sentence ends."""

    categories: torch.Tensor
    sides: tuple[torch.Tensor, torch.Tensor]  # left, right
    stops: torch.Tensor

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> "AssessmentTokens":
        vocab = tok.get_vocab()
        if any(f"BI-RADS {c}" not in vocab for c in BIRADS_CLASSES):
            raise MammorgError("generate.assessment=stage1 needs BI-RADS categories as atomic terms "
                               "(terminology.atomic_terms: true)")
        return cls(_ids(vocab, [f"BI-RADS {c}" for c in BIRADS_CLASSES]),
                   (_ids(vocab, SIDE_WORDS[0]), _ids(vocab, SIDE_WORDS[1])), _ids(vocab, SENTENCE_ENDS))


def assessment_tokens(assessment: str, tok: PreTrainedTokenizerBase) -> AssessmentTokens | None:
    """The tokens for ``generate.assessment`` (None for ``free``); checks the setting."""
    if assessment not in ASSESSMENTS:
        raise MammorgError(f"generate.assessment={assessment!r}: expected {' or '.join(ASSESSMENTS)}")
    return AssessmentTokens.of(tok) if assessment == "stage1" else None


class StatedAssessment(LogitsProcessor):
    """Replace any BI-RADS category term the decoder is about to write with stage 1's."""

    def __init__(self, tokens: AssessmentTokens, birads_label: torch.Tensor):
        """``birads_label``: ``[N, 2]`` stage-1 class index per exam and side (L, R; -1: none)."""
        self.tokens = tokens
        self.targets = torch.cat([birads_label, self._exam(birads_label)], 1)  # [N, 3]: L, R, exam

    @staticmethod
    def _exam(label: torch.Tensor) -> torch.Tensor:
        severity = torch.tensor([birads_severity(c) for c in BIRADS_CLASSES], dtype=torch.float)
        score = torch.where(label >= 0, severity[label.clamp(min=0)], torch.full(label.shape, -1e9))
        best = score.argmax(1, keepdim=True)
        return label.gather(1, best)

    def _context(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 / 1 when the current sentence named the left / right breast last, else 2 (exam)."""
        pos = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)

        def last(ids: torch.Tensor) -> torch.Tensor:
            hit = torch.isin(input_ids, ids.to(input_ids.device))
            if not input_ids.shape[1]:  # first step: nothing generated yet
                return input_ids.new_zeros(input_ids.shape[0])
            return (hit * pos).max(1).values

        left, right, stop = last(self.tokens.sides[0]), last(self.tokens.sides[1]), last(self.tokens.stops)
        side = torch.full_like(left, 2)
        side = torch.where((left > stop) & (left > right), 0, side)
        return torch.where((right > stop) & (right > left), 1, side)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        targets = self.targets.to(scores.device).repeat_interleave(scores.shape[0] // self.targets.shape[0], 0)
        target = targets.gather(1, self._context(input_ids).unsqueeze(1)).squeeze(1)  # class index
        cats = self.tokens.categories.to(scores.device)
        rows = (target >= 0).nonzero().squeeze(1)
        best = scores[rows][:, cats].max(1).values
        scores[rows.unsqueeze(1), cats.unsqueeze(0)] = float("-inf")
        scores[rows, cats[target[rows]]] = best
        return scores
