"""Constrained generation of findings (``generate.findings: stage1``): the report states no
finding that stage 1 did not decide.

A decoder trained on a few hundred reports reads its knowledge tokens loosely: it writes findings
it was not given (and leaves out some it was). In a sentence without a negation or a hedge
(``NEGATIONS`` written as whole tokens: "no", "not", "without", "negative", and "obscure" of the
composition sentence's "may obscure small masses"), a finding term that names a finding stage 1 decided for neither
breast cannot be written; negated sentences ("No mass, calcifications or architectural
distortion") stay free. The decoder still chooses which decided findings to state, their side,
wording and details. Holding it to state every decided finding as well (blocking the impression
heading until each was written) was tried and left out: the tiny decoder then wrote broken
sentences and stated findings on the wrong breast (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mammorg.io import MammorgError
from mammorg.labels import FINDINGS
from stage2_sft.constrained import ids_where, sentence_end_ids
from terminology.lexicon import Lexicon

NEGATIONS = ("no", "not", "without", "negative", "obscure")


def _latest(hits: torch.Tensor) -> torch.Tensor:
    """``[B]`` position (1-based) of the latest hit in ``hits [B, T]`` (0: none)."""
    return (hits * torch.arange(1, hits.shape[1] + 1, device=hits.device)).max(1).values


@dataclass(frozen=True)
class FindingTokens:
    """Token ids the findings constraint needs."""

    finding_of: torch.Tensor  # [V] finding index of each finding-term token, -1 for the rest
    negations: torch.Tensor
    stops: torch.Tensor

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, lexicon: Lexicon) -> FindingTokens:
        vocab = tok.get_vocab()
        finding_of = torch.full((max(len(tok), max(vocab.values()) + 1),), -1, dtype=torch.long)
        terms = [
            (t.term, FINDINGS.index(t.label["finding"])) for t in lexicon.terms if t.label.get("finding") in FINDINGS
        ]
        missing = [term for term, _ in terms if term not in vocab]
        if missing:
            raise MammorgError(
                f"generate.findings=stage1 needs finding terms as atomic terms (terminology.atomic_terms: true); "
                f"missing: {', '.join(missing[:3])}"
            )
        for term, index in terms:
            for spelling in (term, " " + term):
                if spelling in vocab:
                    finding_of[vocab[spelling]] = index
        negations = ids_where(tok, lambda text: text.strip().lower() in NEGATIONS, lambda raw: len(raw) <= 10)
        return cls(finding_of, negations, sentence_end_ids(tok))


class StatedFindings(LogitsProcessor):
    """No finding term of a finding stage 1 did not decide (``decided``: ``[N, 7]``, either
    breast) in a sentence without a negation."""

    def __init__(self, tokens: FindingTokens, decided: torch.Tensor):
        self.tokens, self.decided = tokens, decided.bool()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        decided = self.decided.to(device).repeat_interleave(scores.shape[0] // self.decided.shape[0], 0)
        finding_of = self.tokens.finding_of.to(device)
        term_ids = (finding_of >= 0).nonzero().squeeze(1)
        negated = torch.zeros(scores.shape[0], dtype=torch.bool, device=device)
        if input_ids.shape[1]:  # the current sentence has a negation (after its last stop)
            negation = _latest(torch.isin(input_ids, self.tokens.negations.to(device)))
            negated = negation > _latest(torch.isin(input_ids, self.tokens.stops.to(device)))
        blocked = ~decided[:, finding_of[term_ids]] & ~negated[:, None]  # [B, K]
        scores[:, term_ids] = scores[:, term_ids].masked_fill(blocked, float("-inf"))
        return scores
