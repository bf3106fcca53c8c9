"""Constrained generation: the report states stage 1's BI-RADS categories (``generate.assessment``).

With ``assessment: stage1`` the decoder still chooses where a category goes and words the report
freely, but whenever it writes a BI-RADS category term (an atomic token such as ``BI-RADS 4B``)
the term is the one stage 1 decided for that breast: for the last side named in the sentence
(``Right``/``Left``), else the exam's most severe category. Its score is the best category
score, so the choice to state a category at that point is unchanged.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, birads_severity

ASSESSMENTS = ("free", "stage1")
SIDE_WORDS = {0: ("Left", "ĠLeft", "left", "Ġleft"), 1: ("Right", "ĠRight", "right", "Ġright")}
SENTENCE_ENDS = (".", "Ċ", "ĊĊ", ":")


def _ids(tok: PreTrainedTokenizerBase, tokens) -> list[int]:
    vocab = tok.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


class StatedAssessment(LogitsProcessor):
    """Replace any BI-RADS category term the decoder is about to write with stage 1's."""

    def __init__(self, tok: PreTrainedTokenizerBase, birads_label: torch.Tensor):
        """``birads_label``: ``[N, 2]`` stage-1 class index per exam and side (L, R; -1: none)."""
        ids = [tok.convert_tokens_to_ids(f"BI-RADS {c}") for c in BIRADS_CLASSES]
        if any(i is None or i == tok.unk_token_id for i in ids):
            raise MammorgError("generate.assessment=stage1 needs BI-RADS categories as atomic terms "
                               "(terminology.atomic_terms: true)")
        self.category_ids = torch.tensor(ids)
        self.side_ids = {side: torch.tensor(_ids(tok, words)) for side, words in SIDE_WORDS.items()}
        self.stop_ids = torch.tensor(_ids(tok, SENTENCE_ENDS))
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

        left, right, stop = last(self.side_ids[0]), last(self.side_ids[1]), last(self.stop_ids)
        side = torch.full_like(left, 2)
        side = torch.where((left > stop) & (left > right), 0, side)
        return torch.where((right > stop) & (right > left), 1, side)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        targets = self.targets.to(scores.device).repeat_interleave(scores.shape[0] // self.targets.shape[0], 0)
        target = targets.gather(1, self._context(input_ids).unsqueeze(1)).squeeze(1)  # class index
        cats = self.category_ids.to(scores.device)
        rows = (target >= 0).nonzero().squeeze(1)
        best = scores[rows][:, cats].max(1).values
        scores[rows.unsqueeze(1), cats.unsqueeze(0)] = float("-inf")
        scores[rows, cats[target[rows]]] = best
        return scores
