"""Constrained generation: which BI-RADS category the report states (``generate.assessment``),
and management that agrees with it (``generate.management``).

- ``stage1``: each category the report states is the one stage 1 decided for that breast, and its
  breast composition term (``heterogeneously dense``) is stage 1's density;
- ``plan``: each category the report states is the one the decoder itself wrote in its
  assessment plan (``data.assessment_plan``), so the wording cannot drift from its decision.

The decoder still chooses where a category goes and words the report freely: whenever it writes a
BI-RADS category term (an atomic token such as ``BI-RADS 4B``) the term becomes the target for the
last side named in the sentence (``Right``/``Left``), else the exam's. Its score is the best
category score, so the choice to state a category at that point is unchanged (composition terms
alike). With ``stage1`` and
a plan, the plan's category tokens (``<R:birads=4B>``) are held to stage 1's decisions as well.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, BIRADS_NAMES, DENSITIES, birads_severity
from stage2_sft.config import ASSESSMENTS
from stage2_sft.knowledge import KnowledgeVocabulary
from terminology.lexicon import Lexicon


class Vocabulary:
    """A tokenizer's entries, read once, and their text as decoded (whatever the tokenizer's
    word-boundary marker), decoded once each: the rules below look up a dozen token sets in it
    (read afresh for each set, Gemma's 262k entries took 9 s)."""

    def __init__(self, tok: PreTrainedTokenizerBase):
        self.tok = tok
        self.ids: dict[str, int] = tok.get_vocab()
        self._texts: dict[str, str] = {}

    def text(self, raw: str) -> str:
        if raw not in self._texts:
            self._texts[raw] = self.tok.convert_tokens_to_string([raw])
        return self._texts[raw]

    def where(self, keep: Callable[[str], bool], hint: Callable[[str], bool]) -> torch.Tensor:
        """Ids of the entries whose decoded text satisfies ``keep``; ``hint`` pre-filters the raw
        entries cheaply."""
        ids = [i for raw, i in self.ids.items() if hint(raw) and keep(self.text(raw))]
        return torch.tensor(sorted(ids), dtype=torch.long)

    def flags(self, keep: Callable[[str], bool], hint: Callable[[str], bool], size: int) -> torch.Tensor:
        """``[size]`` whether each id is one of ``where(keep, hint)``."""
        out = torch.zeros(size, dtype=torch.bool)
        out[self.where(keep, hint)] = True
        return out


STEER_MARGIN = 1e-4  # a steered token's score above the row's best remaining one, at least


def promote(scores: torch.Tensor, rows: torch.Tensor | int, ids: torch.Tensor | int, choice: torch.Tensor) -> None:
    """In place: token ``ids`` (one per row) take the place of the rows' own choice, blocked
    (the steers): each gets the score that choice had (``choice``, per row), so it is the row's
    best, and a beam that had to be steered scores as the decoder's own choice would have, no
    better (beam search adds these scores up as log-probabilities)."""
    scores[rows, ids] = torch.maximum(choice, scores[rows].max(-1).values + STEER_MARGIN)


def per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """``values`` (one per exam) repeated for the ``rows`` being decoded (beams: each exam's rows
    are consecutive)."""
    return values.repeat_interleave(rows // values.shape[0], 0)


def latest_hit(input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` position (1-based) of the latest of ``ids`` in each row of ``input_ids`` (0: none)."""
    hits = torch.isin(input_ids, ids.to(input_ids.device))
    return (hits * torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)).max(1).values


def boundary_ids(vocab: Vocabulary) -> torch.Tensor:
    """Tokens that are a lone word boundary (the tokenizer's way to an atomic term: " ", "BI-RADS 1")."""
    return vocab.where(lambda text: text == " ", lambda raw: len(raw) <= 4)


def side_word_ids(vocab: Vocabulary, word: str) -> torch.Tensor:
    """Tokens that spell ``word`` (any case, with or without a leading word boundary)."""
    return vocab.where(lambda text: text.strip().lower() == word, lambda raw: word in raw.lower())


def sentence_end_ids(vocab: Vocabulary, marks: tuple[str, ...] = (".", ":")) -> torch.Tensor:
    """Tokens that end a sentence or a heading: ``marks`` or line breaks (``marks=()``: line
    breaks alone)."""
    return vocab.where(
        lambda text: text.strip(" ") in marks or (text.strip(" ") != "" and not text.strip("\n ")),
        lambda raw: len(raw) <= 4,
    )


def _plan_ids(vocab: dict[str, int]) -> torch.Tensor | None:
    """``[3, 9]`` ids of ``<L:birads=c>``, ``<R:birads=c>``, ``<exam:birads=c>`` (None if absent)."""
    names = KnowledgeVocabulary.plan_categories()
    if any(n not in vocab for row in names for n in row):
        return None
    return torch.tensor([[vocab[n] for n in row] for row in names])


def _plan_finding_ids(vocab: dict[str, int]) -> list[int] | None:
    tokens = KnowledgeVocabulary.plan_findings()
    return [vocab[t] for t in tokens] if all(t in vocab for t in tokens) else None


def _bracket_ids(vocab: dict[str, int]) -> tuple[int, int] | None:
    """Ids of ``<plan>`` and ``</plan>`` (None if absent)."""
    names = (KnowledgeVocabulary.PLAN, KnowledgeVocabulary.PLAN_END)
    return (vocab[names[0]], vocab[names[1]]) if all(n in vocab for n in names) else None


def _spellings(vocab: dict[str, int], terms: list[str]) -> torch.Tensor:
    """``[S, len(terms)]`` ids of atomic ``terms`` in each spelling all of them have (at a line
    start, mid-sentence with the word boundary)."""
    rows = [[vocab[lead + t] for t in terms] for lead in ("", " ") if all(lead + t in vocab for t in terms)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(terms))


def _density_terms(lexicon: Lexicon | None) -> list[str] | None:
    """The composition term of each density class (``DENSITIES`` order), if the lexicon has all."""
    if lexicon is None:
        return None
    terms = [next((t.term for t in lexicon.terms if t.label.get("density") == d), None) for d in DENSITIES]
    return None if None in terms else [str(t) for t in terms]


@dataclass(frozen=True)
class AssessmentTokens:
    """Token ids the processors need: category and composition terms, side words, sentence ends,
    plan tokens."""

    categories: torch.Tensor  # [S, 9]: each spelling of the category terms (line start, mid-sentence)
    sides: tuple[torch.Tensor, torch.Tensor]  # left, right
    stops: torch.Tensor
    plan: torch.Tensor | None = None  # [3, 9]: L, R, exam
    brackets: tuple[int, int] | None = None  # <plan>, </plan>
    densities: torch.Tensor | None = None  # [S, 4]: each spelling of the composition terms
    plan_findings: list[int] | None = None  # the plan's finding tokens in their order (L, then R)
    end: int | None = None  # the end-of-report token
    line_breaks: torch.Tensor | None = None  # tokens that break a line (the category is written on a line of its own)
    management: torch.Tensor | None = None  # the management terms ("routine screening": a report's last line)

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, lexicon: Lexicon | None = None) -> AssessmentTokens:
        words = Vocabulary(tok)
        vocab = words.ids
        if any(f"BI-RADS {c}" not in vocab for c in BIRADS_CLASSES):
            raise MammorgError(
                "generate.assessment needs BI-RADS categories as atomic terms (terminology.atomic_terms: true)"
            )
        density_terms = _density_terms(lexicon)
        densities = _spellings(vocab, density_terms) if density_terms else None
        return cls(
            _spellings(vocab, [f"BI-RADS {c}" for c in BIRADS_CLASSES]),
            (side_word_ids(words, "left"), side_word_ids(words, "right")),
            sentence_end_ids(words),
            _plan_ids(vocab),
            _bracket_ids(vocab),
            densities if densities is not None and len(densities) else None,
            _plan_finding_ids(vocab),
            None if tok.eos_token_id is None else int(tok.eos_token_id),
            sentence_end_ids(words, ()),
            torch.tensor([i for term in MANAGEMENT for i in _ids_of(vocab, term)], dtype=torch.long),
        )


def assessment_tokens(
    assessment: str, tok: PreTrainedTokenizerBase, plan: bool = False, lexicon: Lexicon | None = None
) -> AssessmentTokens | None:
    """The tokens for ``generate.assessment`` (None for ``free``); checks the setting against the
    run (``plan``: whether it was trained with assessment plans; ``lexicon``: the run's terms, for
    the composition terms that ``stage1`` holds as well)."""
    if assessment not in ASSESSMENTS:
        raise MammorgError(f"generate.assessment={assessment!r}: expected {', '.join(ASSESSMENTS)}")
    if assessment == "plan" and not plan:
        raise MammorgError("generate.assessment=plan needs a run trained with data.assessment_plan: true")
    return AssessmentTokens.of(tok, lexicon) if assessment != "free" else None


def exam_category(label: torch.Tensor) -> torch.Tensor:
    """``[N, 1]`` the most severe of the per-side class indices ``label [N, 2]`` (-1: none)."""
    severity = torch.tensor([birads_severity(c) for c in BIRADS_CLASSES], dtype=torch.float, device=label.device)
    score = torch.where(label >= 0, severity[label.clamp(min=0)], torch.full(label.shape, -1e9, device=label.device))
    return label.gather(1, score.argmax(1, keepdim=True))


def _force(scores: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> None:
    """In place: among the token ``ids`` (``[C]``, or ``[S, C]``: each of ``S`` spellings a group
    of its own, no id in two) only ``target`` (class index per row, -1: leave the row alone)
    keeps a score, the best score of its group."""
    rows = (target >= 0).nonzero().squeeze(1)
    if not len(rows):
        return
    groups = ids.reshape(-1, ids.shape[-1])  # [S, C]
    best = scores[rows][:, groups].max(2).values  # [R, S]
    scores[rows.unsqueeze(1), groups.flatten().unsqueeze(0)] = float("-inf")
    scores[rows.unsqueeze(1), groups[:, target[rows]].T] = best


class CategoryChoice(LogitsProcessor, ABC):
    """Hold each stated BI-RADS category term to a target per side (``targets``: ``[B, 3]`` class
    indices for L, R and the exam, -1 where the decoder stays free)."""

    def __init__(self, tokens: AssessmentTokens):
        self.tokens = tokens

    @abstractmethod
    def targets(self, input_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """``[batch, 3]`` target class per row (L, R, exam; -1: free) given the ids so far."""

    def _context(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 / 1 when the current sentence named the left / right breast last, else 2 (exam)."""
        if not input_ids.shape[1]:  # first step: nothing generated yet
            return input_ids.new_full((input_ids.shape[0],), 2)
        left, right, stop = (latest_hit(input_ids, ids) for ids in (*self.tokens.sides, self.tokens.stops))
        side = torch.full_like(left, 2)
        side = torch.where((left > stop) & (left > right), 0, side)
        return torch.where((right > stop) & (right > left), 1, side)

    def hold_plan(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        """Also hold the plan's category tokens to ``targets`` (in place); by default the plan is free."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        targets = self.targets(input_ids, scores.shape[0]).to(scores.device)
        target = targets.gather(1, self._context(input_ids).unsqueeze(1)).squeeze(1)
        _force(scores, self.tokens.categories.to(scores.device), target)  # each spelling held alike
        self.hold_plan(scores, targets)
        return scores


class StatedAssessment(CategoryChoice):
    """The report (and its plan, if any) states stage 1's BI-RADS decisions, and its breast
    composition term is stage 1's density (when the tokens have the composition terms)."""

    def __init__(self, tokens: AssessmentTokens, birads_label: torch.Tensor, density_label: torch.Tensor | None = None):
        """``birads_label``: ``[N, 2]`` stage-1 class index per exam and side (L, R; -1: none);
        ``density_label``: ``[N]`` density class index (-1: none)."""
        super().__init__(tokens)
        self.fixed = torch.cat([birads_label, exam_category(birads_label)], 1)  # [N, 3]
        self.density = density_label

    def targets(self, input_ids: torch.Tensor, batch: int) -> torch.Tensor:
        return per_row(self.fixed, batch)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = super().__call__(input_ids, scores)
        if self.density is not None and self.tokens.densities is not None:
            target = per_row(self.density, scores.shape[0]).to(scores.device)
            _force(scores, self.tokens.densities.to(scores.device), target)
        self.state_before_end(input_ids, scores)
        return scores

    def unstated(self, input_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` whether each row has yet to state stage 1's exam category, and ``[B, S]`` that
        category's spellings."""
        exam = per_row(self.fixed[:, 2], rows).to(input_ids.device)
        spelt = self.tokens.categories.to(input_ids.device)[:, exam.clamp(min=0)].T  # [B, S]
        stated = (input_ids[:, :, None] == spelt[:, None, :]).any(2).any(1)
        return (exam >= 0) & ~stated, spelt

    def state_before_end(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """In place: a report cannot end before it has stated stage 1's exam category (any
        spelling; every beam alike). Traced on a demo: "OPINION: probably benign." and the
        management, with no category written (2 of 44 reports). Where the decoder would end
        there, it writes the category on a line of its own (``write_category``; also on the
        line after a management line, where the decoder, kept from ending, would write its
        management again) and goes on: barring the end alone let a report repeat its
        management line to the token limit (demo)."""
        end = self.tokens.end
        if end is None:
            return
        unstated, spelt = self.unstated(input_ids, scores.shape[0])
        choice, top = scores.max(1)
        rows = unstated.nonzero().squeeze(1)
        if len(rows):
            scores[rows, end] = float("-inf")
        due = unstated & (top == end)
        breaks, management = self.tokens.line_breaks, self.tokens.management
        if breaks is not None and management is not None and len(management) and input_ids.shape[1] > 1:
            breaks = breaks.to(scores.device)  # the line just ended stated management
            ended = latest_hit(input_ids, management.to(scores.device)) > latest_hit(input_ids[:, :-1], breaks)
            due |= unstated & torch.isin(input_ids[:, -1], breaks) & ended
        self.write_category(input_ids, scores, due, spelt, choice)

    def write_category(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        due: torch.Tensor,
        spelt: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: rows ``due`` (``[B]``) write the exam's category (``spelt``: ``[B, S]`` its
        spellings) on a line of their own: a line break first, then its likeliest spelling."""
        breaks = self.tokens.line_breaks
        if breaks is not None and len(breaks) and input_ids.shape[1]:
            breaks = breaks.to(scores.device)
            line_start = torch.isin(input_ids[:, -1], breaks)
            rows = (due & ~line_start).nonzero().squeeze(1)
            if len(rows):
                promote(scores, rows, breaks[scores[rows][:, breaks].argmax(1)], choice[rows])
            due = due & line_start
        rows = due.nonzero().squeeze(1)
        if len(rows):
            best = scores[rows.unsqueeze(1), spelt[rows]].argmax(1)
            promote(scores, rows, spelt[rows, best], choice[rows])

    def hold_plan(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if self.tokens.plan is not None:
            for k in range(3):  # L, R, exam
                _force(scores, self.tokens.plan[k].to(scores.device), targets[:, k])


class CategoryByDeadline(LogitsProcessor):
    """The last of the rules: a report that has not stated stage 1's exam category ``reserve``
    tokens before the token limit writes it there, on a line of its own, whatever the other
    rules chose. Traced on a demo: two findings sections that named their findings on the
    wrong breast went on to the limit (200 tokens), and neither report stated a category."""

    def __init__(self, assessment: StatedAssessment, max_new_tokens: int, reserve: int = 16):
        self.assessment, self.last = assessment, max(0, max_new_tokens - reserve)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] < self.last:
            return scores  # most steps
        unstated, spelt = self.assessment.unstated(input_ids, scores.shape[0])
        self.assessment.write_category(input_ids, scores, unstated, spelt, scores.max(1).values)
        return scores


def shape_plan(
    input_ids: torch.Tensor,
    scores: torch.Tensor,
    plan: list[list[int]],
    brackets: tuple[int, int],
    findings: list[int] | None = None,
) -> None:
    """In place: inside an open plan only the next well-formed plan tokens keep their scores
    (``plan``: ids of [L, R, exam] x classes; ``brackets``: ``<plan>``, ``</plan>``; ``findings``:
    the plan's finding tokens in their order, each at most once, after the categories)."""
    opening, closing = brackets
    findings = findings or []
    for row, ids in enumerate(input_ids.tolist()):
        if opening not in ids:
            continue
        written = ids[len(ids) - ids[::-1].index(opening) :]
        if closing in written:
            continue
        stated = [any(t in plan[k] for t in written) for k in range(3)]
        named = [k for k, t in enumerate(findings) if t in written]
        if named:
            allowed = [*findings[max(named) + 1 :], closing]
        elif stated[1] or stated[2]:
            allowed = [*findings, closing]
        elif stated[0]:
            allowed = [*plan[1], *findings, closing]
        else:
            allowed = [*plan[0], *plan[1], *plan[2]]
        keep = scores[row, allowed].clone()
        scores[row] = float("-inf")
        scores[row, allowed] = keep


class PlannedAssessment(CategoryChoice):
    """The report states the categories of the decoder's own assessment plan, and the plan has
    the form training gave it: at most one category per breast, left before right (or one exam
    category), then ``</plan>``."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = super().__call__(input_ids, scores)
        if self.tokens.plan is not None and self.tokens.brackets is not None:
            shape_plan(input_ids, scores, self.tokens.plan.tolist(), self.tokens.brackets, self.tokens.plan_findings)
        return scores

    def targets(self, input_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if self.tokens.plan is None:
            raise MammorgError("generate.assessment=plan: the tokenizer has no plan tokens")
        plan = self.tokens.plan.to(input_ids.device)  # [3, 9]
        written = (input_ids[:, :, None, None] == plan).any(1)  # [B, 3, 9]
        label = torch.where(written.any(2), written.float().argmax(2), -1)  # [B, 3]
        sides = label[:, :2]
        exam = torch.where(label[:, 2:] >= 0, label[:, 2:], exam_category(sides))
        return torch.cat([sides, exam], 1)


# the management each category calls for (BI-RADS 5th edition); 6 has no lexicon term here
MANAGEMENT = {
    "additional imaging evaluation": ("0",),
    "routine screening": ("1", "2"),
    "short-interval follow-up": ("3",),
    "tissue diagnosis": ("4", "4A", "4B", "4C", "5"),
}


OPENERS = (
    ("additional imaging evaluation", "Recall"),
    ("additional imaging evaluation", " Recall"),
    ("short-interval follow-up", " 6 months"),
    ("short-interval follow-up", " six months"),
)

# how a recommendation sentence opens, per management term: as normalised report text writes it
# (``terminology.normalize``: the lexicon term itself, or "Recall for ..."), and as raw text does.
# When the decoder heads for management the stated category does not call for, it is steered into
# the opening of the management that category calls for
RECOMMENDATIONS = {
    "additional imaging evaluation": ("Recall for additional imaging evaluation", "Recall for additional imaging"),
    "routine screening": ("routine screening", "Routine screening"),
    "short-interval follow-up": ("short-interval follow-up", "Short-interval follow-up"),
    "tissue diagnosis": ("tissue diagnosis", "Tissue diagnosis"),
}


# every spelling of a management phrase, as text (lower case), with its term: the lexicon terms
# and the openers above; the text guard checks candidates against these
MANAGEMENT_PHRASES = tuple(
    dict.fromkeys([*((term, term) for term in MANAGEMENT), *((word.strip().lower(), term) for term, word in OPENERS)])
)
GUARD_PREFIX = 6  # characters of a phrase, from a word start, that count as writing it
GUARD_WINDOW = 16  # tokens of the written tail decoded for the text guard
GUARD_CANDIDATES = 8  # the most likely next tokens checked per row and step


def _inside_phrase(phrases: list[str]) -> Callable[[str], bool]:
    """Whether a token's text (without punctuation and outer spaces, lower case) lies inside one
    of ``phrases``: a token that adds letters no phrase has cannot complete or open one."""

    def inside(text: str) -> bool:
        letters = re.sub(r"[^\w\s-]", "", text).strip().lower()  # "months." can complete "6 months"
        return bool(letters) and any(letters in phrase for phrase in phrases)

    return inside


def _word_starts(text: str, part: str) -> int:
    """How often ``part`` occurs in ``text`` starting at a word start."""
    return sum(1 for m in re.finditer(re.escape(part), text) if m.start() == 0 or not text[m.start() - 1].isalnum())


def opens_phrase(text: str, before: str, phrases: list[str]) -> bool:
    """Whether ``text`` (the tail with a candidate token, lower case) writes one of ``phrases``
    that ``before`` (the tail alone) had not: the whole phrase at a word start, or its first
    ``GUARD_PREFIX`` characters or more at a word start at the end of the text."""
    for phrase in phrases:
        if _word_starts(text, phrase) > _word_starts(before, phrase):
            return True
        for k in range(len(phrase), min(len(phrase), GUARD_PREFIX) - 1, -1):
            start = len(text) - k
            ends_with_start = text.endswith(phrase[:k]) and (start == 0 or not text[start - 1].isalnum())
            if start >= 0 and ends_with_start and not before.endswith(phrase[:k]):
                return True
    return False


def terms_called_for(categories: set[str]) -> list[str]:
    """The management terms any of the categories calls for."""
    return [term for term, called_by in MANAGEMENT.items() if categories & set(called_by)]


def called_for(categories: set[str]) -> str | None:
    """The management term the categories call for (category 0's only when it stands alone: it
    names its imaging itself)."""
    terms = terms_called_for(categories)
    if len(terms) > 1:
        terms = [term for term in terms if "0" not in MANAGEMENT[term]]
    return terms[0] if terms else None


@dataclass(frozen=True)
class PieceRule:
    """A management opening spelt in word pieces: once ``prefix`` is written (at a sentence start
    when ``at_start``), ``piece`` goes on spelling ``term``'s opening, and no other but those of
    the ``shared`` terms."""

    term: str
    prefix: tuple[int, ...]
    piece: int
    at_start: bool
    shared: frozenset[str]

    def applies(self, written: list[int], opens_sentence: Callable[[list[int]], bool]) -> bool:
        n = len(self.prefix)
        if n > len(written) or (n and tuple(written[-n:]) != self.prefix):
            return False
        return not self.at_start or opens_sentence(written[: len(written) - n])


@dataclass(frozen=True)
class SentenceStarts:
    """Whether the next token starts a sentence, from token ids alone: nothing written yet, or
    the last token that is not a space ends a sentence, a heading or a line."""

    ends: frozenset[int]
    spaces: frozenset[int]

    @classmethod
    def of(cls, vocab: Vocabulary) -> SentenceStarts:
        spaces = vocab.where(lambda text: text != "" and not text.strip(" "), lambda raw: len(raw) <= 2)
        return cls(frozenset(sentence_end_ids(vocab).tolist()), frozenset(spaces.tolist()))

    def __call__(self, written: list[int]) -> bool:
        for token in reversed(written):
            if token not in self.spaces:
                return token in self.ends
        return True


def _written_prefix(written: list[int], spelt: tuple[int, ...]) -> int:
    """How many of ``spelt``'s pieces (fewer than all) end ``written``."""
    fits = (k for k in range(len(spelt) - 1, 0, -1) if k <= len(written) and tuple(written[-k:]) == spelt[:k])
    return next(fits, 0)


def spell(tok: PreTrainedTokenizerBase, words: str) -> tuple[int, ...]:
    """The token ids of ``words`` as the tokenizer spells them (no special tokens)."""
    return tuple(tok(words, add_special_tokens=False)["input_ids"])


def recommendation_spellings(tok: PreTrainedTokenizerBase, normalized: bool = True) -> dict[str, list[tuple[int, ...]]]:
    """Each term's recommendation opening (normalised or raw wording) as the tokenizer spells it,
    at a line start and after a space."""
    wording = 0 if normalized else 1
    return {term: [spell(tok, lead + w[wording]) for lead in ("", " ")] for term, w in RECOMMENDATIONS.items()}


def piece_rules(tok: PreTrainedTokenizerBase, normalized: bool = True) -> list[PieceRule]:
    """The piece rules of every management opening spelt in pieces: an opener's last piece once
    the rest is written (anywhere), and each piece of a recommendation's opening written from a
    sentence start; each with the other terms whose openings share the pieces so far."""
    spellings = recommendation_spellings(tok, normalized)
    openings = [(term, spell(tok, word), True) for term, word in OPENERS]
    openings += [(term, spelt, False) for term, spelts in spellings.items() for spelt in spelts if len(spelt) > 1]
    rules: dict[tuple[str, tuple[int, ...], int], PieceRule] = {}
    for term, spelt, opener in openings:
        for k in range(len(spelt) - 1 if opener else 0, len(spelt)):
            if not str(tok.decode(list(spelt[: k + 1]))).strip():
                continue  # a leading space piece starts every word
            shared = frozenset(
                other for other, steers in spellings.items() if any(s[: k + 1] == spelt[: k + 1] for s in steers)
            )
            key, at_start = (term, spelt[:k], spelt[k]), not opener
            if key not in rules or not at_start:  # a rule that holds anywhere wins
                rules[key] = PieceRule(term, spelt[:k], spelt[k], at_start, shared - {term})
    return list(rules.values())


def _ids_of(vocab: dict[str, int], words: str) -> list[int]:
    """The atomic token ids of a term: as written at a line start and mid-sentence."""
    return [vocab[t] for t in (words, " " + words) if t in vocab]


class CategoryNames(LogitsProcessor):
    """A category's name is its own: after a BI-RADS category term and a separator (" -", ":"
    or " (", as every report of the training data names its categories), the name written is
    the category's ACR name ("BI-RADS 4C - High suspicion for malignancy"), in whichever of its
    spellings the decoder prefers (as written, lower case as the lexicon normalises "probably
    benign", with or without a leading word boundary); where the decoder heads elsewhere, the
    likeliest spelling's next token is written; after " (" the name is closed with ")" (traced:
    "BI-RADS 0 (Incomplete - need additional imaging evaluation." written three times over, the
    bracket left open). Traced on the knowledge benchmark: the categories
    held to stage 1's decisions kept the names the decoder had begun for its own ("BI-RADS 4C -
    Low suspicion for malignancy"), 186 wrong names in 1,155 default reports (5 seeds); forcing
    one spelling ("Probably benign" where the decoder knew "probably benign") derailed it."""

    def __init__(self, tok: PreTrainedTokenizerBase):
        words = Vocabulary(tok)
        found = [(i, c) for c, name in BIRADS_NAMES.items() for i in _ids_of(words.ids, f"BI-RADS {c}")]
        self.category_ids = torch.tensor([i for i, _ in found], dtype=torch.long)
        self.category_of = dict(found)
        self.spellings = {
            c: sorted({spell(tok, f"{lead}{form}") for form in (name, name.lower()) for lead in ("", " ")} - {()})
            for c, name in BIRADS_NAMES.items()
        }
        self.separators = frozenset(
            words.where(lambda text: text.strip() in ("-", ":", "("), lambda raw: len(raw) <= 3).tolist()
        )
        self.spaces = frozenset(boundary_ids(words).tolist())
        self.brackets = frozenset(words.where(lambda text: text.endswith("("), lambda raw: len(raw) <= 3).tolist())
        self.closing = words.where(lambda text: text.startswith(")"), lambda raw: len(raw) <= 3)  # ")", ").", ...
        self.longest = max(len(sp) for spellings in self.spellings.values() for sp in spellings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length < 2 or not len(self.category_ids):
            return scores
        last = latest_hit(input_ids, self.category_ids)  # 1-based position of the latest category term
        near = (last > 0) & (length - last <= self.longest + 2)
        choice, top = scores.max(1)
        closing = self.closing.to(scores.device)
        for row in near.nonzero().squeeze(1).tolist():
            at = int(last[row])  # the token after the category term (0-based)
            after = input_ids[row, at:].tolist()
            if len(after) > 1 and after[0] in self.spaces:  # a lone word boundary before the separator
                after = after[1:]
            if not after or after[0] not in self.separators:
                continue
            name, k = after[1:], len(after) - 1  # what follows the separator so far
            spellings = self.spellings[self.category_of[int(input_ids[row, at - 1])]]
            if any(list(sp) == name for sp in spellings):  # the name is written; a bracket closes
                if after[0] in self.brackets and len(closing) and not bool(torch.isin(top[row], closing)):
                    promote(scores, row, closing[scores[row, closing].argmax()], choice[row])
                continue
            going = [sp[k] for sp in spellings if len(sp) > k and list(sp[:k]) == name]
            if going and int(top[row]) not in going:
                best = max(going, key=lambda i: float(scores[row, i]))
                promote(scores, row, best, choice[row])
        return scores


class ConsistentManagement(LogitsProcessor):
    """Management agrees with the report's own assessment: once a category has been written (the
    most severe so far; before any, the plan's), management terms that other categories call for
    cannot be written; the decoder words the rest freely."""

    def __init__(self, tok: PreTrainedTokenizerBase, normalized: bool = True):
        """``normalized``: the decoder learnt report text normalised to lexicon terms
        (``terminology.normalize``), which words recommendations differently."""
        words = Vocabulary(tok)
        vocab = words.ids
        found = [
            (vocab[t], c)
            for c in BIRADS_CLASSES
            for t in (f"BI-RADS {c}", f" BI-RADS {c}", *(f"<{s}:birads={c}>" for s in ("L", "R", "exam")))
            if t in vocab
        ]
        self.category_ids = torch.tensor([i for i, _ in found], dtype=torch.long)
        self.classes = [c for _, c in found]
        plan_ids = {vocab[t] for row in KnowledgeVocabulary.plan_categories() for t in row if t in vocab}
        self.in_report = torch.tensor([i not in plan_ids for i, _ in found], dtype=torch.bool)
        self.severity = torch.tensor([float(birads_severity(c)) for c in self.classes])
        self.terms = {term: torch.tensor(_ids_of(vocab, term), dtype=torch.long) for term in MANAGEMENT}
        self.rules = piece_rules(tok, normalized)
        self.spellings = {
            t: [s for s in spelts if s] for t, spelts in recommendation_spellings(tok, normalized).items()
        }
        self.active = bool(found) and all(ids.numel() for ids in self.terms.values())
        self.tok = tok
        self.phrases = [(phrase, set(MANAGEMENT[term])) for phrase, term in MANAGEMENT_PHRASES]
        self.full_stops = sentence_end_ids(words, (".",))  # they end a category's name; ":" does not
        self.opens_sentence = SentenceStarts.of(words)
        # tokens whose letters lie inside a management phrase: only these can write one
        inside = _inside_phrase([phrase for phrase, _ in MANAGEMENT_PHRASES])
        self.phrase_pieces = frozenset(
            words.where(inside, lambda raw: inside(raw.replace("Ġ", " ").replace("▁", " "))).tolist()
        )

    def stated(self, input_ids: torch.Tensor) -> tuple[list[set[str]], list[bool]]:
        """Per row, the categories whose management may be written: the most severe category
        the report has written so far (before it writes any, its plan's), and the most recent one
        when it is 0 and its sentence has not ended (its name, "BI-RADS 0 - Incomplete - need
        additional imaging evaluation", follows it; a recommendation after the sentence is the
        exam's). A plan that disagrees with the report's own categories does not count. Also per
        row: whether the report has written a category of its own."""
        hits = input_ids[:, :, None] == self.category_ids.to(input_ids.device)  # [B, T, K]
        in_report = self.in_report.to(input_ids.device)
        report_written = (hits & in_report).flatten(1).any(1)  # [B]
        hits = hits & (in_report | ~report_written[:, None, None])
        seen = hits.any(1)
        severity = torch.where(seen, self.severity.to(input_ids.device), -1.0)
        best_severity, best = severity.max(1)
        position = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[None, :, None]
        last_position, latest = (hits * position).amax(1).max(1)  # the category token written last
        open_name = last_position > latest_hit(input_ids, self.full_stops)  # no "." or line break after it
        out = []
        for v, b, last, naming in zip(best_severity.tolist(), best.tolist(), latest.tolist(), open_name.tolist()):
            allowed = {self.classes[int(b)]} if v >= 0 else set()
            if allowed and naming and self.classes[int(last)] == "0":
                allowed.add("0")
            out.append(allowed)
        return out, report_written.tolist()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.active or not input_ids.shape[1]:
            return scores
        for row, (categories, assessed) in enumerate(zip(*self.stated(input_ids))):
            if not categories:
                continue
            top = int(scores[row].argmax())
            choice = scores[row, top].clone()
            written = input_ids[row].tolist()
            allowed = set(terms_called_for(categories))
            for term in MANAGEMENT:
                if term not in allowed:
                    scores[row, self.terms[term].to(scores.device)] = float("-inf")
            self.block_pieces(written, scores[row], allowed, assessed)
            self.guard_text(row, input_ids, scores, categories)
            target = called_for(categories)
            if target is not None and torch.isneginf(scores[row, top]):
                steer = self.steer(written, scores[row], target)
                if steer is not None:
                    promote(scores, row, steer, choice)
        return scores

    def block_pieces(self, written: list[int], scores: torch.Tensor, allowed: set[str], assessed: bool) -> None:
        """Block (in one row's ``scores``) the piece rules of management other than ``allowed``
        (those at sentence starts only once the report has ``assessed``: its findings may open
        with the same letters, "Round" and "Routine")."""
        for rule in self.rules:
            if rule.term in allowed or rule.shared & allowed or (rule.at_start and not assessed):
                continue
            if rule.applies(written, self.opens_sentence):
                scores[rule.piece] = float("-inf")

    def steer(self, written: list[int], scores: torch.Tensor, target: str) -> int | None:
        """The piece that goes on with ``target``'s recommendation opening: of its spellings that
        agree with the most pieces written (none, or only a space: from a sentence start only),
        the next piece the decoder likes best."""
        best, pieces = -1, []
        for spelt in self.spellings[target]:
            k = _written_prefix(written, spelt)
            if k > best:
                best, pieces = k, [spelt[k]]
            elif k == best:
                pieces.append(spelt[k])
        spaces_only = all(piece in self.opens_sentence.spaces for piece in written[len(written) - best :])
        if spaces_only and not self.opens_sentence(written):
            return None  # mid-sentence ("A |"): no opening to go on with
        return max(pieces, key=lambda piece: float(scores[piece]))

    def guard_text(self, row: int, input_ids: torch.Tensor, scores: torch.Tensor, categories: set[str]) -> None:
        """The same rule on the decoded text, for management the decoder spells in its own word
        pieces (a pretrained tokenizer): the most likely next tokens that would start writing a
        phrase the categories do not call for are blocked."""
        forbidden = [phrase for phrase, called_by in self.phrases if not categories & called_by]
        tail = input_ids[row, -GUARD_WINDOW:].tolist()
        before: str | None = None  # decoded only when a candidate could write a phrase
        allowed = 0
        for cand in scores[row].topk(min(GUARD_CANDIDATES, scores.shape[1])).indices.tolist():
            if torch.isneginf(scores[row, cand]):
                continue
            if cand in self.phrase_pieces:
                if before is None:
                    before = str(self.tok.decode(tail, skip_special_tokens=True)).lower()
                text = str(self.tok.decode([*tail, cand], skip_special_tokens=True)).lower()
                if opens_phrase(text, before, forbidden):
                    scores[row, cand] = float("-inf")
                    continue
            allowed += 1
            if allowed >= 2:  # greedy takes the first; beam search looks a little further
                break


class GenerationRules(LogitsProcessor):
    """The generation rules of a batch applied in order as one processor: transformers reads the
    call signature of every processor in a list at every step (``inspect.signature``, 5% of the
    decoding time of the demo's reports with five rules)."""

    def __init__(self, rules: Sequence[LogitsProcessor]):
        self.rules = list(rules)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for rule in self.rules:
            scores = rule(input_ids, scores)
        return scores


def assessment_processor(
    assessment: str, tokens: AssessmentTokens | None, birads_label: torch.Tensor, density: torch.Tensor | None = None
) -> CategoryChoice | None:
    """The processor of ``generate.assessment`` for a batch (None for ``free``); ``density``:
    ``[N, 4]`` stage 1's density probabilities (all zero: unknown)."""
    if tokens is None:
        return None
    if assessment == "stage1":
        label = None if density is None else torch.where(density.sum(-1) > 0, density.argmax(-1), -1)
        return StatedAssessment(tokens, birads_label, label)
    return PlannedAssessment(tokens) if assessment == "plan" else None
