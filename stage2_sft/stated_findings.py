"""Constrained generation of findings (``generate.findings: stage1``): the report states no
finding that stage 1 did not decide, and none on a breast stage 1 did not decide it for.

A decoder trained on a few hundred reports reads its knowledge tokens loosely: it writes findings
it was not given, puts findings on the wrong breast (and leaves out some it was given). Outside
sentences with a negation or a hedge (``NEGATIONS`` written as whole tokens: "no", "not",
"without", "negative", and "obscure" of the composition sentence's "may obscure small masses";
negated sentences such as "No mass, calcifications or architectural distortion" stay free):

- a finding term can only name a finding stage 1 decided for the breast the line is about (a
  side word earlier in the line: "Right Breast: A focal asymmetry ..."), or, in a line that has
  not named a breast yet, for either breast;
- after a finding term, a side word can only name a breast stage 1 decided every finding of the
  sentence for ("A focal asymmetry is seen ... of the right breast").

A breast's line that stage 1 decided nothing for opens with a negation ("No suspicious mass
..."), not with a lesion whose term would then be blocked. And the report names every finding
stage 1 decided (``StatedFindings.complete``): a breast's line goes on, sentence by sentence,
until it has named its breast's decided findings, and a findings section of one line per
finding does not end before it has named them (nor open by denying them all). The decoder words
each sentence: the opening of a finding left over is given as the reports open it (a
calcification's morphology term, "There is a" or "A" and a size for a mass, "A focal asymmetry",
"An intramammary lymph node"), the rest is the decoder's. Holding the report open without saying
what comes next (blocking the impression heading until each finding was written) was tried
first and left out: the tiny decoder then wrote broken sentences and put findings on the wrong
breast (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mammorg.io import MammorgError
from mammorg.labels import DESCRIBED_FINDING, DESCRIPTORS, FINDINGS
from stage2_sft.constrained import (
    Vocabulary,
    boundary_ids,
    latest_hit,
    per_row,
    promote,
    sentence_end_ids,
    side_word_ids,
    spell,
)
from stage2_sft.knowledge import DEPTHS, QUADRANTS
from terminology.lexicon import Lexicon

MASS = FINDINGS.index("mass")
CALCIFICATION = FINDINGS.index("calcification")
ASSOCIATED = [FINDINGS.index("skin_thickening"), FINDINGS.index("nipple_retraction")]  # "There is associated ..."
NOT_ASSOCIATED = [f for f in range(len(FINDINGS)) if f not in ASSOCIATED]
ARTICLES = ("A", "An")
ARTICLE_OF = {"mass": "A", "asymmetry": "A", "lymph_node": "An"}  # "A 12 mm oval mass", "An intramammary lymph node"
NEGATIONS = ("no", "not", "without", "negative", "obscure")
DESCRIBING = {  # lexicon categories of descriptor terms, and the finding they describe
    "mass_shape": "mass",
    "mass_margin": "mass",
    "mass_density": "mass",
    "calc_benign": "calcification",
    "calc_suspicious": "calcification",
    "calc_distribution": "calcification",
}


def _first_pieces(tok: PreTrainedTokenizerBase, headings: tuple[str, ...]) -> torch.Tensor:
    """The first token of each heading as it opens a line (the whole heading where the
    tokenizer learnt it from reports; Gemma's "IM" of "IM PRESS ION", an upper-case piece of two
    letters or more); none where that piece is too short to tell the heading from other words
    (the rules that need it then stay off)."""

    def telling(i: int) -> bool:
        text = str(tok.decode([i])).strip()
        return len(text) >= 4 or (len(text) >= 2 and text.isalpha() and text.isupper())

    firsts = {tok(h, add_special_tokens=False)["input_ids"][0] for h in headings}
    return torch.tensor(sorted(i for i in firsts if telling(i)), dtype=torch.long)


def _side_phrase(
    tok: PreTrainedTokenizerBase, side_ids: torch.Tensor, side: str, lead: str = " ", preposition: str = "of"
) -> tuple[int, ...]:
    """ " of the left" (or " of the Left"; ``preposition="in"``: " in the left") as the tokenizer
    spells it with the side word whole (the rules see a breast named only in whole side words);
    none if it spells neither so. ``lead=""``: spelled without its leading word boundary (to
    follow a lone boundary token)."""
    for word in (side, side.capitalize()):
        phrase = spell(tok, f"{lead}{preposition} the {word}")
        if phrase and phrase[-1] in side_ids.tolist():
            return phrase
    return ()


def _mark_ids(vocab: Vocabulary, mark: str) -> torch.Tensor:
    """Tokens that spell the punctuation ``mark`` alone (with or without a word boundary)."""
    return vocab.where(lambda text: text.strip(" ") == mark, lambda raw: len(raw) <= 4)


@dataclass(frozen=True)
class FindingTokens:
    """Token ids the findings constraint needs."""

    finding_of: torch.Tensor  # [V] finding index of each finding-term token, -1 for the rest
    negations: torch.Tensor
    stops: torch.Tensor  # sentence ends (".", ":", line breaks)
    line_breaks: torch.Tensor
    sides: tuple[torch.Tensor, torch.Tensor]  # left, right
    breast: torch.Tensor  # "breast" ("in the breast": no side)
    the: torch.Tensor
    colons: torch.Tensor  # ":" (line headings: "Right Breast:")
    spaces: torch.Tensor  # a lone word boundary (before an atomic term: "Right Breast:", " ", "BI-RADS 1")
    categories: torch.Tensor  # the BI-RADS category terms ("Right breast: BI-RADS 4A")
    periods: torch.Tensor
    mass_opener: tuple[int, ...]  # " There is a"
    mass_line_opener: tuple[int, ...]  # "There is a" (at a line start)
    associated_opener: tuple[int, ...]  # " There is associated"
    associated_line_opener: tuple[int, ...]  # "There is associated" (at a line start)
    side_phrases: tuple[tuple[int, ...], tuple[int, ...]]  # " of the left", " of the right" (empty: not whole)
    bare_side_phrases: tuple[tuple[int, ...], tuple[int, ...]]  # "of the left", ... (after a lone boundary)
    line_terms: torch.Tensor  # the finding terms' spellings without a leading word boundary
    findings_heading: torch.Tensor  # "FINDINGS" (a section of one line per finding), its first piece
    impression_headings: torch.Tensor  # "IMPRESSION", "OPINION", their first pieces
    line_heads: torch.Tensor  # the first pieces of "FINDINGS", "IMPRESSION", "OPINION", "Overall" (once each)
    word_ends: torch.Tensor  # [V] whether each token ends in a letter or digit (mid-word: no heading after it)
    digit_ends: torch.Tensor  # [V] whether each token ends in a digit ("7" of "7.1")
    digit_starts: torch.Tensor  # [V] whether each token starts with a digit ("1" of "7.1")
    place_of: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [V] quadrant, clock, depth each token names (-1: none)
    at: torch.Tensor  # "at" (before a clock position: "at 12 o'clock")
    clock_pairs: torch.Tensor  # [13, 2] a position spelt in two digits ("1", "1"): its first's value, its second
    oclock: tuple[int, ...]  # " o'clock"
    describes: torch.Tensor  # [V, 7] the findings a token describes ("oval": a mass; "associated": skin, nipple)
    opener_of: torch.Tensor  # [V] the finding a sentence opened with the token names (-1: none)
    openers: torch.Tensor  # what a sentence naming a finding left over opens with (``_opening_ids``)
    line_openers: torch.Tensor  # the same at a line start
    articles: torch.Tensor  # [2, 2] "A", "An" (``ARTICLES``) after a boundary (" A"), on their own ("A"); -1: no token
    article_of: torch.Tensor  # [7] the article the rules open each finding's sentence with (``ARTICLES``; -1: none)
    term_article: torch.Tensor  # [V] the article each finding term follows ("An asymmetry"; ``_articles``; -1: none)
    numbers: tuple[torch.Tensor, torch.Tensor]  # numbers after a word boundary (" 12") and on their own ("12"): a size
    inner_articles: torch.Tensor  # [2] " a", " an" inside a sentence ("There is a"); -1: not one token
    spaced: torch.Tensor  # [V] whether an opener's spelling starts with a word boundary (" mass"; other ids: False)
    associated: torch.Tensor  # "associated" whole in one token ("There is associated ..."); empty: not whole
    line_denial: int  # "No" opening a line, one token (-1: not one)
    both_breasts: torch.Tensor  # "either", "both", "bilateral" ("in either breast")
    denial_side_phrases: tuple[tuple[int, ...], tuple[int, ...]]  # " in the left", " in the right" (empty: not whole)

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, lexicon: Lexicon) -> FindingTokens:
        words = Vocabulary(tok)
        vocab = words.ids
        size = max(len(tok), max(vocab.values()) + 1)
        finding_of = torch.full((size,), -1, dtype=torch.long)
        term_article = torch.full((size,), -1, dtype=torch.long)
        terms = [  # a term's other number names its finding too ("no suspicious calcification")
            (spelt, FINDINGS.index(t.label["finding"]))
            for t in lexicon.terms
            if t.label.get("finding") in FINDINGS
            for spelt in t.spellings
        ]
        missing = [term for term, _ in terms if term not in vocab]
        if missing:
            raise MammorgError(
                f"generate.findings=stage1 needs finding terms as atomic terms (terminology.atomic_terms: true); "
                f"missing: {', '.join(missing[:3])}"
            )
        # every entry that spells a term whole: the atomic term and the tokenizer's own pieces
        # ("mass" is Gemma's "▁mass", which the decoder writes rather than the bare term)
        named = {term.lower(): index for term, index in terms}
        articles = _articles(lexicon)
        last_word = re.compile("|".join(sorted({re.escape(term.split()[-1]) for term in named})), re.IGNORECASE)
        for raw, i in vocab.items():
            text = words.text(raw).strip().lower() if last_word.search(raw) else None
            if text in named:
                finding_of[i] = named[text]
                term_article[i] = articles.get(text, -1)
        negations = words.where(lambda text: text.strip().lower() in NEGATIONS, lambda raw: len(raw) <= 10)
        sides = (side_word_ids(words, "left"), side_word_ids(words, "right"))
        colons = _mark_ids(words, ":")
        spaces = boundary_ids(words)
        categories = words.where(lambda text: text.strip().startswith("BI-RADS "), lambda raw: "BI-RADS" in raw)
        associated = sorted(  # the word whole in one piece, or nothing
            {i for line in (" ", "") for i in spell(tok, f"{line}There is associated")[-1:]}
        )
        associated = [i for i in associated if str(tok.decode([i])).strip() == "associated"]
        opener_of = _opener_of(finding_of, vocab)
        canonical = set(lexicon.canonical_terms())  # a sentence left to open names its finding by the term
        line_terms = torch.tensor(sorted(vocab[term] for term, _ in terms if term in canonical))
        describes = _describes(words, size, lexicon, associated)
        place_of = _place_of(words, size)
        return cls(
            finding_of,
            negations,
            sentence_end_ids(words),
            sentence_end_ids(words, ()),
            sides,
            side_word_ids(words, "breast"),
            side_word_ids(words, "the"),
            colons,
            spaces,
            categories,
            _mark_ids(words, "."),
            spell(tok, " There is a"),
            spell(tok, "There is a"),
            spell(tok, " There is associated"),
            spell(tok, "There is associated"),
            (_side_phrase(tok, sides[0], "left"), _side_phrase(tok, sides[1], "right")),
            (_side_phrase(tok, sides[0], "left", ""), _side_phrase(tok, sides[1], "right", "")),
            line_terms,
            _first_pieces(tok, ("FINDINGS",)),
            _first_pieces(tok, ("IMPRESSION", "OPINION")),
            _first_pieces(tok, ("FINDINGS", "IMPRESSION", "OPINION", "Overall")),
            words.flags(lambda text: text[-1:].isalnum(), lambda raw: raw[-1:].isalnum(), size),
            words.flags(lambda text: _digits(text[-1:]), lambda raw: _digits(raw[-1:]), size),
            words.flags(lambda text: _digits(text[:1]), lambda raw: _digits(raw[:1]), size),
            place_of,
            side_word_ids(words, "at"),
            _clock_pairs(tok, place_of[1]),
            spell(tok, " o'clock"),
            describes,
            opener_of,
            _opening_ids((finding_of >= 0).nonzero().squeeze(1), finding_of, opener_of),
            _opening_ids(line_terms, finding_of, opener_of),
            torch.tensor([[_one_token(tok, lead + a) for lead in (" ", "")] for a in ARTICLES]),
            torch.tensor([ARTICLES.index(ARTICLE_OF[f]) if f in ARTICLE_OF else -1 for f in FINDINGS]),
            term_article,
            (
                words.where(lambda text: text[:1] == " " and _size(text[1:]), lambda raw: len(raw) <= 4),
                words.where(_size, lambda raw: len(raw) <= 3),
            ),
            torch.tensor([_one_token(tok, " " + a.lower()) for a in ARTICLES]),
            _spaced(tok, size, finding_of, opener_of),
            torch.tensor(associated, dtype=torch.long),
            _one_token(tok, "No"),
            torch.cat([side_word_ids(words, w) for w in ("either", "both", "bilateral")]),
            (
                _side_phrase(tok, sides[0], "left", preposition="in"),
                _side_phrase(tok, sides[1], "right", preposition="in"),
            ),
        )


def _articles(lexicon: Lexicon) -> dict[str, int]:
    """The article (``ARTICLES`` index) each finding term may follow at a sentence's opening,
    lower-cased spelling → index: "A" for every spelling of a mass (its size comes next: "A 12 mm
    oval mass"); for an asymmetry or a lymph node, as the term sounds ("A focal asymmetry", "An
    asymmetry", "An intramammary lymph node", "A lymph node"), and none for a plural. Traced:
    with only the finding's article, "A asymmetry is ..." 19 times in Gemma's test reports of
    the one-style knowledge benchmark."""
    out = {}
    for t in lexicon.terms:
        finding = t.label.get("finding")
        if finding not in ARTICLE_OF:
            continue
        for spelt in t.spellings:
            if finding == "mass":
                out[spelt.lower()] = ARTICLES.index("A")
            elif spelt == t.term:
                out[spelt.lower()] = ARTICLES.index("An" if spelt[:1].lower() in "aeiou" else "A")
    return out


def _spaced(tok: PreTrainedTokenizerBase, size: int, finding_of: torch.Tensor, opener_of: torch.Tensor) -> torch.Tensor:
    """``[V]`` whether each finding term or opener starts with a word boundary (" mass"; the
    atomic terms do not: a lone boundary comes first); False for the other ids."""
    out = torch.zeros(size, dtype=torch.bool)
    for i in ((finding_of >= 0) | (opener_of >= 0)).nonzero().squeeze(1).tolist():
        out[i] = str(tok.decode([i])).startswith(" ")
    return out


def _digits(text: str) -> bool:
    """Whether ``text`` is written in the digits 0-9 only. ``str.isdigit`` and ``int`` also take
    other scripts' digits, and Gemma's vocabulary has them as tokens: traced on the knowledge
    benchmark, stage 1's "1 o'clock" was written as "at  \u09e7 o'clock" (a Bengali one)."""
    return text.isascii() and text.isdigit()


def _size(text: str) -> bool:
    """Whether ``text`` is a number that can open a size ("12", not "0" or "07")."""
    return _digits(text) and text[0] != "0"


def _one_token(tok: PreTrainedTokenizerBase, text: str) -> int:
    """The id of ``text`` if the tokenizer spells it as one token, else -1."""
    ids = spell(tok, text)
    return ids[0] if len(ids) == 1 else -1


def _opening_ids(terms: torch.Tensor, finding_of: torch.Tensor, opener_of: torch.Tensor) -> torch.Tensor:
    """The tokens a sentence that names a finding left over opens with: ``terms`` (finding
    terms), calcifications' replaced by the calcification morphology terms (``opener_of``)."""
    calcs = finding_of[terms] == CALCIFICATION
    extra = (opener_of >= 0) & (finding_of < 0)
    return torch.cat([terms[~calcs], extra.nonzero().squeeze(1)]) if extra.any() else terms


def _describes(words: Vocabulary, size: int, lexicon: Lexicon, associated: list[int]) -> torch.Tensor:
    """``[V, 7]`` the findings each token describes: the descriptor terms of the label space
    (``DESCRIPTORS``: mass shapes and margins, calcification morphologies and distributions;
    "round" describes both) and of the lexicon's descriptor categories (``DESCRIBING``: "equal
    density" too), each spelt whole in one entry, and ``associated`` ("There is associated":
    skin thickening, nipple retraction)."""
    out = torch.zeros(size, len(FINDINGS), dtype=torch.bool)
    described: dict[str, set[int]] = {}
    for name, values in DESCRIPTORS.items():
        for value in values:
            described.setdefault(value, set()).add(FINDINGS.index(DESCRIBED_FINDING[name]))
    for term in lexicon.terms:
        if term.category in DESCRIBING:
            described.setdefault(term.term.lower(), set()).add(FINDINGS.index(DESCRIBING[term.category]))
    longest = max(len(v) for v in described) + 2
    hint = re.compile("|".join(sorted({re.escape(v.split()[-1]) for v in described})), re.IGNORECASE)
    for raw, i in words.ids.items():
        if len(raw) <= longest and hint.search(raw):  # decoding each of Gemma's 262k takes seconds
            for f in described.get(words.text(raw).strip().lower(), ()):
                out[i, f] = True
    for i in associated:
        out[i, ASSOCIATED] = True
    return out


def _opener_of(finding_of: torch.Tensor, vocab: dict[str, int]) -> torch.Tensor:
    """``[V]`` the finding a sentence opened with each token names: a finding term names its
    finding, except that calcifications open with their morphology ("Fine pleomorphic
    calcifications ...", as reports write them: a sentence opened with the bare term ran into
    "calcifications or mass, segmental ..." in the demo), where the tokenizer has the
    morphology terms whole."""
    out = finding_of.clone()
    morphology = [vocab[m] for m in DESCRIPTORS["calc_morphology"] if m in vocab]
    if morphology:
        out[finding_of == CALCIFICATION] = -1
        out[torch.tensor(morphology)] = CALCIFICATION
    return out


def _place_of(words: Vocabulary, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[V]`` each token's quadrant (``QUADRANTS`` index: the atomic "upper outer quadrant"), clock
    position (a number from 1 to 12 in one token: " 12") and depth (``DEPTHS`` index: " middle");
    -1 for the rest."""
    out = (torch.full((size,), -1), torch.full((size,), -1), torch.full((size,), -1))
    quadrants = {f"{q} quadrant": k for k, q in enumerate(QUADRANTS)}
    hint = re.compile(r"quadrant|anterior|middle|posterior|^.?\d\d?$", re.IGNORECASE)
    for raw, i in words.ids.items():
        if len(raw) > 24 or not hint.search(raw):
            continue  # most entries: decoding each of Gemma's 262k takes seconds
        text = words.text(raw).strip().lower()
        if text in quadrants:
            out[0][i] = quadrants[text]
        elif _digits(text) and 1 <= int(text) <= 12 and len(text) <= 2:
            out[1][i] = int(text)
        elif text in DEPTHS:
            out[2][i] = DEPTHS.index(text)
    return out


def _clock_pairs(tok: PreTrainedTokenizerBase, clock_of: torch.Tensor) -> torch.Tensor:
    """``[13, 2]`` for each clock position that no single token names, spelt in two digit tokens
    (Gemma and Qwen write "11" as "1", "1"): the position its first token names (1) and the id
    of its second; -1 for the positions written in one token (" 11" of the tiny BPE)."""
    out = torch.full((13, 2), -1, dtype=torch.long)
    for value in range(10, 13):
        ids = spell(tok, str(value))
        if bool((clock_of == value).any()) or len(ids) != 2 or int(clock_of[ids[0]]) != value // 10:
            continue
        if str(tok.decode([ids[1]])) == str(value % 10):
            out[value] = torch.tensor([value // 10, ids[1]])
    return out


def write_phrase(
    input_ids: torch.Tensor,
    scores: torch.Tensor,
    rows: torch.Tensor,
    phrase: tuple[int, ...],
    start: torch.Tensor,
    top: torch.Tensor,
    choice: torch.Tensor,
    after: torch.Tensor | None = None,
) -> None:
    """In place: ``rows`` (``[B]``) write ``phrase`` token by token: its first token where
    ``start`` (``[B]``), each next one where the text ends with the phrase's beginning (which
    follows one of ``after``, if given) and the decoder would write something else."""
    if not phrase or not bool(rows.any()):
        return  # most calls: the rules call it each step for each of their phrases
    device = scores.device
    length = input_ids.shape[1]
    spelt = torch.tensor(phrase, dtype=torch.long, device=device)
    for k in range(min(len(phrase), length if after is not None else length + 1)):
        if k == 0:
            go = rows & start
        else:
            go = rows & (input_ids[:, -1] == phrase[k - 1]) & (top != phrase[k])
            if not bool(go.any()):
                continue
            go &= (input_ids[:, length - k :] == spelt[:k]).all(1)
        if after is not None:
            go &= torch.isin(input_ids[:, -k - 1], after.to(device))
        hit = go.nonzero().squeeze(1)
        if len(hit):
            promote(scores, hit, phrase[k], choice[hit])


def carry_sides(one_side: torch.Tensor, found: torch.Tensor, associated: torch.Tensor) -> torch.Tensor:
    """``[B, S, 2]`` each sentence's breast (``one_side``: the sentences that name one breast),
    where a sentence of associated features only (``associated``: ``[B, S]``, it has the word;
    ``found``: ``[B, S, 7]`` the findings it names) that names no breast is on the breast of
    the latest sentence before it that names one: "There is associated skin thickening." on the
    line after its mass, as the reports write it and the parser reads it."""
    has = one_side.any(-1)  # [B, S]
    index = torch.arange(has.shape[1], device=has.device)[None].expand_as(has)
    latest = torch.cummax(torch.where(has, index, -1), 1).values  # the latest sentence with a breast
    carried = one_side.gather(1, latest.clamp(min=0)[..., None].expand_as(one_side)) & (latest >= 0)[..., None]
    takes = associated & found[..., ASSOCIATED].any(-1) & ~found[..., NOT_ASSOCIATED].any(-1) & ~has
    return torch.where(takes[..., None], carried, one_side)


class StatedFindings(LogitsProcessor):
    """Findings and their sides held to stage 1's decisions (``decided``: ``[N, 2, 7]``, L and R)
    outside negated sentences."""

    def __init__(
        self, tokens: FindingTokens, decided: torch.Tensor, continued: bool = True, where: torch.Tensor | None = None
    ):
        """``continued``: a breast's line names every finding stage 1 decided for it
        (``complete``); ``where``: ``[N, 2, 7, 3]`` the quadrant, clock position and depth stage 1
        gave each finding (-1: unknown), which its sentence then states (``hold_locations``;
        None: the decoder's own)."""
        self.tokens, self.decided, self.continued, self.where = tokens, decided.bool(), continued, where
        # what may open the line of a breast stage 1 decided nothing for (``open_empty_lines``)
        self.line_openers = torch.cat([tokens.negations, tokens.categories, tokens.spaces])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        rows = scores.shape[0]
        decided = per_row(self.decided.to(device), rows)  # [B, 2, 7]
        finding_of = self.tokens.finding_of.to(device)
        term_ids = (finding_of >= 0).nonzero().squeeze(1)
        choice, top = scores.max(1)  # the decoder's own choice, before any rule
        if not input_ids.shape[1]:
            allowed = described = decided.any(1)
        else:
            latest = {
                name: latest_hit(input_ids, ids)
                for name, ids in (
                    ("negation", self.tokens.negations),
                    ("line", self.tokens.line_breaks),
                    ("left", self.tokens.sides[0]),
                    ("right", self.tokens.sides[1]),
                )
            }
            latest["stop"] = self.latest_end(input_ids, self.tokens.stops)
            negated = latest["negation"] > latest["stop"]
            named = [
                (latest[s] > latest["line"]) & (latest[s] > latest[o])
                for s, o in (("left", "right"), ("right", "left"))
            ]
            mentions = self.mentions(input_ids)  # read once per step by the rules below
            written = self.named_since(mentions, latest["stop"]) & ~negated[:, None]  # in this sentence
            allowed = torch.where(
                named[0][:, None], decided[:, 0], torch.where(named[1][:, None], decided[:, 1], decided.any(1))
            )
            unsided = ~(named[0] | named[1])
            allowed, home = self.home_breast(allowed, decided, written, unsided)
            mass_only = self.opened_as_mass(input_ids, latest["stop"]) & ~negated & allowed[:, MASS]  # "A 12 mm ..."
            allowed = allowed & ~(mass_only[:, None] & (torch.arange(len(FINDINGS), device=device) != MASS))
            described = allowed | written | negated[:, None]  # what the sentence's words may describe
            allowed = (allowed & ~written) | negated[:, None]  # each finding once a sentence
            findings = section, open_section = self.findings_section(input_ids)
            unnamed = decided  # what each breast has still to name, followed in findings sections only
            if open_section.any():
                named_for = self.named_by_side(input_ids, mentions, section, latest["stop"])
                unnamed = torch.where(open_section[:, None, None], decided & ~named_for, decided)
                said = self.said_associated(unnamed, decided, open_section & unsided, written | negated[:, None])
                allowed, described = allowed & ~said, described & ~said
            sided = named[0] | named[1] | self.carried(input_ids, latest, section, open_section, decided, written)
            self.hold_sides(input_ids, scores, decided, unnamed, written, sided, top, choice)
            side = torch.where(named[0], 0, torch.where(named[1], 1, -1))
            if self.where is not None:
                pending = self.hold_locations(
                    input_ids, scores, mentions, latest, side, home, decided, self.where, top, choice
                )
                self.finish_clock(input_ids, scores, top, choice, pending)
        blocked = ~allowed[:, finding_of[term_ids]]  # [B, K]
        scores[:, term_ids] = scores[:, term_ids].masked_fill(blocked, float("-inf"))
        self.block_descriptions(scores, described)
        self.steer(input_ids, scores, top, choice, term_ids, allowed)
        if input_ids.shape[1]:
            self.hold_articles(input_ids, scores)
            self.leave_for_home(input_ids, scores, home, finding_of[top], top, choice)
            empty = torch.where(named[0], ~decided[:, 0].any(1), named[1] & ~decided[:, 1].any(1))
            self.open_empty_lines(input_ids, scores, empty, top, choice)
            self.one_line_each(input_ids, scores)
            self.open_missing_lines(input_ids, scores, decided, top, choice)
            self.headings_open_lines(input_ids, scores)
            if self.continued:
                line = latest["line"]
                self.complete(input_ids, mentions, scores, decided, unnamed, side, line, findings, top, choice)
        return scores

    def hold_locations(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        mentions: torch.Tensor,
        latest: dict[str, torch.Tensor],
        side: torch.Tensor,
        home: torch.Tensor,
        decided: torch.Tensor,
        where: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> torch.Tensor:
        """In place: a finding's sentence states the location stage 1 gave it (``where``): where the
        decoder writes a quadrant, a clock position (after "at") or a depth, stage 1's is written
        instead, if known ("in the upper outer quadrant at 12 o'clock, ..., middle depth" with
        stage 1's quadrant, clock and depth; the distance from the nipple stays the decoder's).
        A position spelt in two digits ("1", "1" for Gemma's 11) is written digit by digit; the
        rows whose position waits for its second digit are returned (``[B]``), for ``finish_clock``.
        The finding is the sentence's latest; its breast the line's (``side``), the side word
        written in the sentence, its home (``home_breast``) or the one breast stage 1 decided it
        for. Traced on the knowledge benchmark: the decoder wrote the same location for most
        findings ("upper outer quadrant at 12 o'clock, 8.5 cm from the nipple, middle depth" in
        203 of 231 reports of one seed), stage 1's quadrant being right for 80% of the findings
        it found."""
        device = scores.device
        place_of = [ids.to(device) for ids in self.tokens.place_of]
        value = torch.stack([ids[top] for ids in place_of], 1)  # [B, 3] what the decoder's choice names
        value[:, 1] = torch.where(self.follows_at(input_ids, -1), value[:, 1], -1)
        written_clock = self.clock_before(input_ids, -1)
        pending = torch.zeros_like(written_clock, dtype=torch.bool)
        if (value < 0).all() and (written_clock < 0).all():
            return pending  # most steps
        rows = torch.arange(len(top), device=device)
        pos = torch.arange(1, input_ids.shape[1] + 1, device=device)
        inside = mentions & (pos[None] > latest["stop"][:, None])[..., None]  # [B, T, 7] this sentence's findings
        at = (inside.any(2) * pos).max(1).values  # the latest (1-based; 0: none)
        finding = inside[rows, (at - 1).clamp(min=0)].float().argmax(1)
        stated = torch.where(latest["left"] > latest["right"], 0, 1)
        stated = torch.where(torch.maximum(latest["left"], latest["right"]) > latest["stop"], stated, -1)
        only = decided[rows, :, finding]  # [B, 2] the breasts stage 1 decided the finding for
        sole = torch.where(only.sum(1) == 1, only[:, 1].long(), -1)
        breast = torch.where(side >= 0, side, torch.where(stated >= 0, stated, torch.where(home >= 0, home, sole)))
        target = per_row(where.to(device), len(top))[rows, breast.clamp(min=0), finding]  # [B, 3]
        target = torch.where(((at > 0) & (breast >= 0))[:, None], target, -1)
        # a clock position stage 1 gave, once written, is not run on into another ("1" then "2")
        done = (written_clock >= 0) & (written_clock == target[:, 1])
        digits = self.tokens.digit_starts.to(device)
        scores[:, digits] = scores[:, digits].masked_fill(done[:, None], float("-inf"))
        # one spelt in two digits: the first is what the decoder's number must name, then the second
        split = self.tokens.clock_pairs.to(device)[target[:, 1].clamp(min=0)]  # [B, 2]
        split = torch.where((target[:, 1] >= 0)[:, None], split, -1)
        pending = (written_clock >= 0) & (split[:, 0] == written_clock) & (split[:, 1] >= 0)
        hit = pending.nonzero().squeeze(1)
        if len(hit):
            promote(scores, hit, split[hit, 1], choice[hit])
        target = target.clone()
        target[:, 1] = torch.where(split[:, 0] >= 0, split[:, 0], target[:, 1])
        change = (value >= 0) & (target >= 0) & (value != target)
        for k, ids in enumerate(place_of):
            hit = change[:, k].nonzero().squeeze(1)
            if not len(hit):
                continue
            named = (ids >= 0).nonzero().squeeze(1)
            want = ids[named][None] == target[hit, k][:, None]  # [H, K] the tokens naming stage 1's value
            best = scores[hit][:, named].masked_fill(~want, float("-inf")).argmax(1)
            ok = want.any(1)  # a value the tokenizer has no single token for stays the decoder's
            promote(scores, hit[ok], named[best[ok]], choice[hit[ok]])
        return pending

    def finish_clock(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
        pending: torch.Tensor,
    ) -> None:
        """In place: "at" and a clock position go on with " o'clock" (traced: stage 1's "10" written
        where the decoder had headed for "5", the decoder went on as after a size: "at 10 mm
        o'clock"), except in ``pending`` rows ([B]: the position's second digit comes first) and
        where the decoder goes on with a second digit itself ("1", "1": 11). Traced on the
        knowledge benchmark: before the second digit was allowed, Gemma 3 wrote no clock
        position above 9 (68 times "1 o'clock" in 231 reports, against 15 in the references)."""
        phrase = self.tokens.oclock
        device = scores.device
        at = self.tokens.at.to(device)
        length = input_ids.shape[1]
        if not bool(torch.isin(input_ids[:, -len(phrase) - 4 :], at).any()):
            return  # most steps: no "at" among the latest tokens
        spelt = torch.tensor(phrase, dtype=torch.long, device=device)
        pairs = self.tokens.clock_pairs.to(device)
        first = self.clock_before(input_ids, -1)
        second = (pairs[None, :, 0] == first[:, None]) & (pairs[None, :, 1] == top[:, None])  # [B, 13]
        for k in range(min(len(phrase), length - 1)):
            go = (top != phrase[k]) & (input_ids[:, length - k :] == spelt[:k]).all(1) & ~pending
            go &= self.clock_before(input_ids, -k - 1) >= 0
            if k == 0:
                go &= ~((first >= 0) & second.any(1))
            hit = go.nonzero().squeeze(1)
            if len(hit):
                promote(scores, hit, phrase[k], choice[hit])

    def clock_before(self, input_ids: torch.Tensor, end: int) -> torch.Tensor:
        """``[B]`` the clock position written by the tokens that end at ``end`` (negative) after
        "at": one token (" 12", "5"), or two digits (Gemma's "1", "1"); -1: none."""
        device = input_ids.device
        length = input_ids.shape[1]
        if length < 1 - end:
            return torch.full((input_ids.shape[0],), -1, device=device)
        clock_of = self.tokens.place_of[1].to(device)
        one = torch.where(self.follows_at(input_ids, end - 1), clock_of[input_ids[:, end]], -1)
        pairs = self.tokens.clock_pairs.to(device)
        if length < 2 - end or not bool((pairs[:, 1] >= 0).any()):
            return one
        first, last = clock_of[input_ids[:, end - 1]], input_ids[:, end]
        match = (pairs[None, :, 0] == first[:, None]) & (pairs[None, :, 1] == last[:, None]) & (first >= 0)[:, None]
        two = torch.where(match.any(1) & self.follows_at(input_ids, end - 2), match.long().argmax(1), -1)
        return torch.where(two >= 0, two, one)

    def follows_at(self, input_ids: torch.Tensor, at: int) -> torch.Tensor:
        """``[B]`` whether the token at position ``at`` (negative) is "at", or a lone word boundary
        after "at" (Gemma's " at", " ", "5", " o'clock")."""
        if input_ids.shape[1] < -at:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        words = self.tokens.at.to(input_ids.device)
        hit = torch.isin(input_ids[:, at], words)
        if input_ids.shape[1] > -at:
            spaced = torch.isin(input_ids[:, at], self.tokens.spaces.to(input_ids.device))
            hit |= spaced & torch.isin(input_ids[:, at - 1], words)
        return hit

    @staticmethod
    def home_breast(
        allowed: torch.Tensor, decided: torch.Tensor, written: torch.Tensor, unsided: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In a line that names no breast yet (``unsided``: ``[B]``), a sentence whose findings
        (``written``: ``[B, 7]``) stage 1 decided for one breast only (its home) names no finding
        that breast lacks: that sentence will be placed on its home (``place``), and a finding of
        the other breast would land there too. Traced on the knowledge benchmark: "calcifications
        in a 27 mm round equal density focal asymmetry ... of the left breast", the asymmetry
        decided for the right breast alone. Returns the findings ``allowed`` (``[B, 7]``) and each
        row's home (0 / 1; -1: none, or both breasts fit)."""
        fits = (decided | ~written[:, None]).all(2) & written.any(1)[:, None]  # [B, 2]
        one = unsided & (fits.sum(1) == 1)
        home = torch.where(one, fits[:, 1].long(), -1)
        mine = decided[torch.arange(len(home), device=home.device), home.clamp(min=0)]
        return torch.where(one[:, None], allowed & mine, allowed), home

    def leave_for_home(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        home: torch.Tensor,
        headed: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: where the decoder headed for a finding (``headed``: the finding of its choice,
        -1: no finding term) that the sentence's home breast (``home_breast``) lacks, the
        sentence names its breast instead (" of the left", then ``place`` goes on): blocking the
        term alone left "calcifications, 4." (tried), the finding's side lost. After a lone word
        boundary (the decoder's way to a term) the phrase comes without its own ("density of
        the left", not "density  of the left")."""
        device = scores.device
        rows = (home >= 0) & (headed >= 0)
        if rows.any():
            decided = per_row(self.decided.to(device), len(home))
            rows &= ~decided[torch.arange(len(home), device=device), home.clamp(min=0), headed.clamp(min=0)]
        spaces = self.tokens.spaces.to(device)
        spaced = torch.isin(input_ids[:, -1], spaces)
        for s, (phrase, bare) in enumerate(zip(self.tokens.side_phrases, self.tokens.bare_side_phrases)):
            if bare:  # token by token, each step while the sentence has this home
                write_phrase(input_ids, scores, home == s, bare, rows & spaced, top, choice, after=spaces)
            if phrase:  # its first token (``place`` writes the rest)
                write_phrase(input_ids, scores, rows & (home == s) & ~(spaced & bool(bare)), phrase, rows, top, choice)

    def carried(
        self,
        input_ids: torch.Tensor,
        latest: dict[str, torch.Tensor],
        section: torch.Tensor,
        open_section: torch.Tensor,
        decided: torch.Tensor,
        written: torch.Tensor,
    ) -> torch.Tensor:
        """``[B]`` whether the sentence being written names associated features only
        (``written``: ``[B, 7]``) with the word "associated" and no breast, in an open findings
        section (``section``: its heading's position) after a sentence naming a breast stage 1
        decided them for: the sentence is on that breast (``carry_sides``, the parser's reading)
        and ``place`` leaves it without a side of its own. ``latest``: the positions of the
        latest side words and sentence end. Traced on the knowledge benchmark: "There is
        associated skin thickening of the right breast." after its mass's line, where every
        reference writes the sentence without a side (13 of 13); it led Gemma into repeating the
        mass's sentence (3 reports)."""
        device = input_ids.device
        word = latest_hit(input_ids, self.tokens.associated.to(device)) > latest["stop"]
        only = written[:, ASSOCIATED].any(1) & ~written[:, NOT_ASSOCIATED].any(1)
        left, right = latest["left"], latest["right"]
        side = (right > left).long()
        fits = (decided[torch.arange(len(side), device=device), side] | ~written).all(1)
        return open_section & word & only & (torch.maximum(left, right) > section) & fits

    @staticmethod
    def said_associated(
        unnamed: torch.Tensor, decided: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """``[B, 7]`` the associated features that a line of a findings section naming no breast
        (``rows``: ``[B]``) may not name again: named for every breast stage 1 decided them for
        (``unnamed``, ``decided``: ``[B, 2, 7]``), unless ``keep`` (``[B, 7]``: written in the
        sentence, or the sentence is negated). Blocked with their terms is the word
        "associated" (``FindingTokens.describes``). Traced on the knowledge benchmark: the
        tiny decoder wrote "There is associated nipple retraction." three times over."""
        said = decided.any(1) & ~unnamed.any(1) & rows[:, None] & ~keep
        said[:, NOT_ASSOCIATED] = False
        return said

    def mentions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, 7]`` the finding each position names (one-hot), outside negated sentences."""
        found = self.tokens.finding_of.to(input_ids.device)[input_ids]  # [B, T]
        named = (found >= 0) & ~self.negated_at(input_ids)
        return torch.nn.functional.one_hot(found.clamp(min=0), len(FINDINGS)).bool() & named[..., None]

    @staticmethod
    def named_since(mentions: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """``[B, 7]`` the findings ``mentions`` names after position ``start`` (``[B]``, 1-based)."""
        pos = torch.arange(1, mentions.shape[1] + 1, device=mentions.device)
        return (mentions & (pos[None] > start[:, None])[..., None]).any(1)

    def named_by_side(
        self, input_ids: torch.Tensor, mentions: torch.Tensor, start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        """``[B, 2, 7]`` the findings named for each breast (L, R) by the sentences between
        positions ``start`` and ``end`` (``[B]``, 1-based; ``end`` inclusive) that name one
        breast, as in a findings section of one line per finding ("A focal asymmetry is seen
        ... of the right breast ..."); a sentence that names no breast names its findings for
        neither (the parser leaves them unsided)."""
        device = input_ids.device
        stops = self.ends_at(input_ids, self.tokens.stops)
        sentence = torch.cumsum(stops, 1) - stops.long()  # a stop belongs to the sentence it ends
        pos = torch.arange(1, input_ids.shape[1] + 1, device=device)[None]
        inside = ((pos > start[:, None]) & (pos <= end[:, None]))[..., None]
        sides = torch.stack([torch.isin(input_ids, ids.to(device)) for ids in self.tokens.sides], -1)

        def per_sentence(hits: torch.Tensor) -> torch.Tensor:  # [B, T, K] -> [B, S, K]
            index = sentence[..., None].expand(-1, -1, hits.shape[-1])
            out = torch.zeros(hits.shape[0], int(sentence.max()) + 1, hits.shape[-1], device=device)
            return out.scatter_add_(1, index, (hits & inside).float()) > 0

        found, named = per_sentence(mentions), per_sentence(sides)
        one_side = named & (named.sum(-1, keepdim=True) == 1)  # [B, S, 2]
        associated = per_sentence(torch.isin(input_ids, self.tokens.associated.to(device))[..., None])
        one_side = carry_sides(one_side, found, associated[..., 0])
        return (one_side[..., None] & found[:, :, None, :]).any(1)

    def findings_section(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` the position of the findings heading ("FINDINGS:", a section of one line per
        finding; 0: none) and whether that section is still open (no impression heading since)."""
        section = latest_hit(input_ids, self.tokens.findings_heading)
        return section, (section > 0) & (latest_hit(input_ids, self.tokens.impression_headings) < section)

    def negated_at(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` whether each position lies in a sentence with a negation before it."""
        pos = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[None]
        last_negation = torch.cummax(torch.isin(input_ids, self.tokens.negations.to(input_ids.device)) * pos, 1)
        last_stop = torch.cummax(self.ends_at(input_ids, self.tokens.stops) * pos, 1)
        return last_negation.values > last_stop.values

    def ends_at(self, input_ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` where ``ends`` (sentence ends) end a sentence: not a decimal point ("7.1 cm",
        a period between digits; the latest token counts as an end until a digit follows it)."""
        device = input_ids.device
        hits = torch.isin(input_ids, ends.to(device))
        if input_ids.shape[1] > 2:
            point = torch.isin(input_ids[:, 1:-1], self.tokens.periods.to(device))
            digits = self.tokens.digit_ends.to(device)[input_ids[:, :-2]]
            digits &= self.tokens.digit_starts.to(device)[input_ids[:, 2:]]
            hits[:, 1:-1] &= ~(point & digits)
        return hits

    def latest_end(self, input_ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``[B]`` the position (1-based; 0: none) of the latest sentence end among ``ends``."""
        pos = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
        return (self.ends_at(input_ids, ends) * pos).max(1).values

    def complete(
        self,
        input_ids: torch.Tensor,
        mentions: torch.Tensor,
        scores: torch.Tensor,
        decided: torch.Tensor,
        unnamed: torch.Tensor,
        side: torch.Tensor,
        line: torch.Tensor,
        section: tuple[torch.Tensor, torch.Tensor],
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: the report names every finding stage 1 decided. The decoder names about one
        finding per line (traced on the knowledge benchmark: breasts with two or more decided
        findings, 116 of their 300 findings named), so

        - a breast's line that has named one of its breast's findings, or its heading line
          ("Left Breast: ..."; the category lines of an impression name a breast and no
          finding), goes on, sentence by sentence, until it has named the others ("... middle
          depth. architectural distortion is seen in ...");
        - a findings section ("FINDINGS:", one line per finding; ``section``: its heading's
          position and whether it is open) does not end while a decided finding is unnamed for
          its breast (the next line names it; the side words follow ``hold_sides``). Skin
          thickening and nipple retraction are not added to a finding's line there: they open
          the next line ("There is associated skin thickening.", ``follow_with_associated``)
          on the breast of the line before (``carried``), as every reference writes them; added
          to the mass's line, Gemma wrote them again on the next line;
        - neither a findings section nor the heading line of a breast opens by denying every
          finding ("There is no mass ... in either breast.", "Right Breast: No mass ...") when
          stage 1 decided one for them."""
        device = scores.device
        tokens = self.tokens
        named = self.named_since(mentions, line)
        mine = decided[torch.arange(len(side), device=device), side.clamp(min=0)]
        # a breast's heading line ("Left Breast: ..."), not a line of categories ("Left breast: BI-RADS 2")
        heading = (latest_hit(input_ids, tokens.colons) > line) & (latest_hit(input_ids, tokens.categories) <= line)
        remaining = mine & ~named & (side >= 0)[:, None] & (named.any(1) | heading)[:, None]
        start, open_section = section
        own_line = open_section & ~heading  # a findings section's line: associated features follow on their own
        remaining[:, ASSOCIATED] &= ~own_line[:, None]
        lead = tokens.spaces[0] if len(tokens.spaces) else None  # a tokenizer without a lone boundary: the term
        all_terms = tokens.openers
        line_end = (tokens.periods, tokens.line_breaks)  # a sentence ends; the decoder would end the line
        openers = (tokens.mass_opener, tokens.associated_opener)
        self.open_next(input_ids, scores, remaining, line_end, lead, all_terms, openers, top, choice)
        sentence = self.latest_end(input_ids, tokens.periods)
        first = open_section & (sentence < start)  # its first sentence
        negations = tokens.negations.to(device)  # denies nothing stage 1 decided
        deny = (first & decided.flatten(1).any(1)) | (heading & (side >= 0) & mine.any(1) & (sentence <= line))
        scores[:, negations] = scores[:, negations].masked_fill(deny[:, None], float("-inf"))
        denied = deny & torch.isin(top, negations)
        if bool(denied.any()):
            self.open_denied(
                input_ids, scores, denied, torch.where(first[:, None], decided.any(1), mine & ~named), choice
            )
        # a finding left for a breast (``unnamed``: not named in a sentence naming that breast
        # alone) while the section has named it fewer times than the breasts it was decided for
        # (a finding named without its breast is not named again: the tiny decoder then wrote
        # the same sideless sentence again)
        pos = torch.arange(1, mentions.shape[1] + 1, device=device)
        tries = (mentions & (pos[None] > start[:, None])[..., None]).sum(1)  # [B, 7] mentions in the section
        remaining = unnamed.any(1) & (tries < decided.sum(1)) & open_section[:, None]
        section_end = (tokens.line_breaks, tokens.impression_headings)  # a line ends; the decoder would close
        self.open_next(
            input_ids,
            scores,
            remaining,
            section_end,
            None,
            tokens.line_openers,
            (tokens.mass_line_opener, tokens.associated_line_opener),
            top,
            choice,
        )
        self.follow_with_associated(input_ids, scores, unnamed & remaining[:, None], side, start, top, choice)
        self.deny_the_other_breast(input_ids, scores, decided, unnamed, section, top, choice)

    def deny_the_other_breast(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        decided: torch.Tensor,
        unnamed: torch.Tensor,
        section: tuple[torch.Tensor, torch.Tensor],
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place, in a findings section once every decided finding is named, at a line start:

        - where one breast's findings were named and stage 1 decided nothing for the other, not
          named yet, the line opens with "No" and the decoder words the denial; the line names
          that breast only (the named breast's side words and "either", "both" are blocked;
          where the decoder heads for one of them, or would end the line without a side, that
          breast's side word or " in the left" (right) is written). Every reference with
          findings in one breast has such a line (64 of 64 in the two-style knowledge
          benchmark's test set); Gemma 3 270M left it out in 28 of its 108 such reports, the
          tiny decoder in 16 of 52, and Gemma repeated its finding lines there instead (2);
        - where both breasts are named (each with a decided finding, or "either", "both"), the
          impression heading follows: no reference's findings section has any other line. The
          demo's tiny decoder, both breasts' masses named, went on to "There is no mass,
          suspicious calcification, or architectural distortion in the left breast."."""
        start, open_section = section
        tokens = self.tokens
        if not bool(open_section.any()) or tokens.line_denial < 0:
            return
        device = scores.device
        length = input_ids.shape[1]
        in_section = torch.arange(1, length + 1, device=device)[None] > start[:, None]
        sides = [ids.to(device) for ids in tokens.sides]
        both_ids = tokens.both_breasts.to(device)
        named = torch.stack([(torch.isin(input_ids, ids) & in_section).any(1) for ids in sides], 1)  # [B, 2]
        both = (torch.isin(input_ids, both_ids) & in_section).any(1)
        left_out = ~decided.any(2) & ~named & named.flip(1) & (open_section & ~both)[:, None]  # [B, 2]
        at_start, _ = self.line_starts(input_ids)
        done = at_start & open_section & ~unnamed.flatten(1).any(1)  # a line opens, every decided finding named
        covered = done & (named.all(1) | both)
        headings = tokens.impression_headings.to(device)
        rows = (covered & ~torch.isin(top, headings)).nonzero().squeeze(1)
        if len(rows):  # nothing left to write in the section
            promote(scores, rows, headings[scores[rows][:, headings].argmax(1)], choice[rows])
        if not bool(left_out.any()):
            return
        rows = (done & left_out.any(1) & (top != tokens.line_denial)).nonzero().squeeze(1)
        if len(rows):
            promote(scores, rows, tokens.line_denial, choice[rows])
        line = latest_hit(input_ids, tokens.line_breaks)  # the current line's first token is at ``line`` (0-based)
        first = input_ids.gather(1, line.clamp(max=length - 1)[:, None]).squeeze(1)
        denying = (line < length) & (first == tokens.line_denial) & left_out.any(1)
        if not bool(denying.any()):
            return
        other = left_out[:, 1].long()  # the breast the line names
        named_side = [sides[1], sides[0]]  # what each ``other`` blocks
        blocked = torch.cat([both_ids, tokens.breast.to(device)])
        for s, ids in enumerate(named_side):
            mask = (denying & (other == s))[:, None]
            scores[:, ids] = scores[:, ids].masked_fill(mask, float("-inf"))
            scores[:, both_ids] = scores[:, both_ids].masked_fill(mask, float("-inf"))
            headed = denying & (other == s) & torch.isin(top, torch.cat([ids, blocked]))
            headed &= torch.isin(input_ids[:, -1], tokens.the.to(device))  # "in the" right, breast, ...
            hit = headed.nonzero().squeeze(1)
            if len(hit):
                promote(scores, hit, sides[s][scores[hit][:, sides[s]].argmax(1)], choice[hit])
        self.place(input_ids, scores, torch.where(denying, other, -1), top, choice, tokens.denial_side_phrases)

    def open_denied(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        denied: torch.Tensor,
        wanted: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: where the decoder headed for a negation ``complete`` denies (``denied``:
        ``[B]``), the likeliest finding ``wanted`` (``[B, 7]``) opens there instead: at a
        sentence's opening as ``open_with`` writes it, inside one ("There is") with " a" or " an"
        or its term. Traced on the knowledge benchmark: "Right Breast: There is present in the
        lower inner quadrant ...", " no" blocked and the decoder's next word taken."""
        device = scores.device
        tokens = self.tokens
        openers = tokens.openers.to(device)
        finding = tokens.opener_of.to(device)[openers]
        candidates = scores[:, openers].masked_fill(~wanted[:, finding], float("-inf"))
        denied = denied & ~torch.isneginf(candidates).all(1)
        if not bool(denied.any()):
            return
        best = openers[candidates.argmax(1)]  # [B]
        opens, _, bare = self.opening(input_ids)
        rows = (denied & opens).nonzero().squeeze(1)
        if len(rows):
            self.open_with(scores, rows, best[rows], bare[rows], choice)
        rows = (denied & ~opens).nonzero().squeeze(1)
        if len(rows):
            self.open_with(scores, rows, best[rows], torch.zeros_like(rows, dtype=torch.bool), choice, inside=True)

    def open_next(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        remaining: torch.Tensor,
        end: tuple[torch.Tensor, torch.Tensor],
        lead: torch.Tensor | None,
        terms: torch.Tensor,
        openers: tuple[tuple[int, ...], tuple[int, ...]],
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: where the decoder would close (its choice among ``end[1]``) right after one
        of ``end[0]`` while findings remain (``remaining``: ``[B, 7]``), the next sentence opens
        with the likeliest remaining finding other than a mass or an associated feature (one of
        ``terms``, after ``lead``, a lone word boundary, if given; calcifications with their
        likeliest morphology term, ``FindingTokens.openers``; an asymmetry or a lymph node
        after its article, ``open_with``: ". intramammary lymph node is seen" 51 times in the
        knowledge benchmark's default reports of 3 seeds); a mass with ``openers[0]``
        ("There is a"), and the decoder describes it (a sentence opened with the bare term ran
        into "mass, suspicious mass, or mass"); skin thickening and nipple retraction, left
        last, with ``openers[1]`` ("There is associated") and their term (opened with the bare
        term, the decoder ended the sentence there: "skin thickening." 40 times in the default
        reports of the knowledge benchmark's 5 seeds, never so in the references)."""
        if not bool(remaining.any()):
            return  # most steps
        device = scores.device
        last = input_ids[:, -1]
        boundary, closing = end[0].to(device), end[1].to(device)
        closes = torch.isin(top, closing)
        others = remaining.clone()
        others[:, [MASS, *ASSOCIATED]] = False
        opener_of = self.tokens.opener_of.to(device)
        term_ids = terms.to(device)
        wanted = others[:, opener_of[term_ids]]  # [B, K]
        best = term_ids[scores[:, term_ids].masked_fill(~wanted, float("-inf")).argmax(1)]  # [B]
        takes = self.tokens.article_of.to(device)[opener_of[best]] >= 0
        if lead is None:
            opens_term = others.any(1) & torch.isin(last, boundary) & closes
        else:
            first = others.any(1) & torch.isin(last, boundary) & closes
            rows = (first & ~takes).nonzero().squeeze(1)
            if len(rows):
                promote(scores, rows, int(lead), choice[rows])
            rows = (first & takes).nonzero().squeeze(1)  # " A": its article after the sentence's end
            if len(rows):
                self.open_with(scores, rows, best[rows], torch.zeros_like(rows, dtype=torch.bool), choice)
            led = (last == lead) & torch.isin(input_ids[:, -2], boundary) if input_ids.shape[1] > 1 else last < 0
            opens_term = others.any(1) & led & ~(wanted & (term_ids[None] == top[:, None])).any(1)
        rows = opens_term.nonzero().squeeze(1)
        if len(rows):
            bare = torch.ones_like(rows, dtype=torch.bool)  # at a line start, or after the lone boundary
            self.open_with(scores, rows, best[rows], bare, choice)
        self.follow_article(input_ids, scores, wanted & ~remaining[:, MASS, None], term_ids, top, choice)
        mass = remaining[:, MASS] & ~others.any(1)
        write_phrase(input_ids, scores, mass, openers[0], closes, top, choice, boundary)  # "There is a"
        associated = remaining[:, ASSOCIATED].any(1) & ~others.any(1) & ~mass
        write_phrase(input_ids, scores, associated, openers[1], closes, top, choice, boundary)
        self.name_associated(input_ids, scores, remaining & associated[:, None], openers[1], top, choice)

    def follow_with_associated(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        unnamed: torch.Tensor,
        side: torch.Tensor,
        start: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place, in an open findings section (``start``: its heading's position): the line
        after a line about a breast whose associated features are still ``unnamed`` (``[B, 2,
        7]``) opens with them, "There is associated" and the term, without a side (``carried``),
        as the references write them. ``side``: the breast the current line names (-1: none
        yet). Left to the section's end, they came after a line of the other breast and needed
        "of the right breast", which led the tiny decoder astray (6 of 15 reports)."""
        device = scores.device
        left, right = latest_hit(input_ids, self.tokens.sides[0]), latest_hit(input_ids, self.tokens.sides[1])
        before = (right > left).long()  # the breast of the latest line that named one
        wanted = unnamed[torch.arange(len(side), device=device), before].clone()
        wanted[:, NOT_ASSOCIATED] = False
        rows = wanted.any(1) & (side < 0) & (torch.maximum(left, right) > start)
        opener = self.tokens.associated_line_opener
        always = torch.ones_like(rows)
        write_phrase(input_ids, scores, rows, opener, always, top, choice, self.tokens.line_breaks)
        self.name_associated(input_ids, scores, wanted & rows[:, None], opener, top, choice)

    def name_associated(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        remaining: torch.Tensor,
        opener: tuple[int, ...],
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: after ``opener`` ("There is associated", and a lone word boundary if the
        decoder writes one) the term of a remaining associated feature follows (``remaining``:
        ``[B, 7]``), not the one already named again."""
        device = scores.device
        k = len(opener)
        if not k or input_ids.shape[1] < k:
            return
        spaces = self.tokens.spaces.to(device)
        spelt = torch.tensor(opener, device=device)
        after = (input_ids[:, -k:] == spelt).all(1)
        spaced = torch.zeros_like(after)  # the opener and a lone word boundary
        if input_ids.shape[1] > k:
            spaced = torch.isin(input_ids[:, -1], spaces) & (input_ids[:, -k - 1 : -1] == spelt).all(1)
        finding_of = self.tokens.finding_of.to(device)
        term_ids = (finding_of >= 0).nonzero().squeeze(1)
        wanted = remaining[:, finding_of[term_ids]]  # [B, K]
        heads_right = (wanted & (term_ids[None] == top[:, None])).any(1) | (after & torch.isin(top, spaces))
        rows = ((after | spaced) & wanted.any(1) & ~heads_right).nonzero().squeeze(1)
        if len(rows):
            best = scores[rows][:, term_ids].masked_fill(~wanted[rows], float("-inf")).argmax(1)
            promote(scores, rows, term_ids[best], choice[rows])

    def line_starts(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` whether the next token opens a line, and ``[B, T]`` whether each position
        opened one (the first, or after a line break)."""
        breaks = torch.isin(input_ids, self.tokens.line_breaks.to(input_ids.device))
        return breaks[:, -1], torch.cat([torch.ones_like(breaks[:, :1]), breaks[:, :-1]], 1)

    def one_line_each(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """In place: a side word or a heading ("FINDINGS", "IMPRESSION", "OPINION", "Overall")
        cannot open a second line (no reference report opens two lines with the same breast or
        heading). Traced on the demo: a line completed with its breast's findings was followed by
        the same breast's line again, which looped to the token limit; on the knowledge benchmark
        "Overall: BI-RADS 0 (...)." five times over (the decoder headed for its own category, 4B,
        each time) and "FINDINGS:" twice."""
        device = scores.device
        at_start, line_start = self.line_starts(input_ids)
        if not at_start.any():
            return
        for ids in self.tokens.sides:
            ids = ids.to(device)
            opened = (torch.isin(input_ids, ids) & line_start).any(1) & at_start
            scores[:, ids] = scores[:, ids].masked_fill(opened[:, None], float("-inf"))
        heads = self.tokens.line_heads.to(device)  # each on its own
        opened = ((input_ids[..., None] == heads) & line_start[..., None]).any(1) & at_start[:, None]  # [B, H]
        scores[:, heads] = scores[:, heads].masked_fill(opened, float("-inf"))

    def open_missing_lines(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        decided: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: a report of one line per breast ("Right Breast: ...") does not open its
        impression ("OPINION", "IMPRESSION") before the line of each breast stage 1 decided a
        finding for: where the decoder heads for the heading, that breast's line opens (its side
        word, in the decoder's likeliest spelling). Traced on the knowledge benchmark: a right
        breast's line, its terms steered off, went on to "OPINION: ..." without the left breast's
        line and its asymmetry."""
        device = scores.device
        at_start, line_start = self.line_starts(input_ids)
        heading = at_start & torch.isin(top, self.tokens.impression_headings.to(device))
        if not heading.any():
            return  # most steps
        sides = [ids.to(device) for ids in self.tokens.sides]
        opened = torch.stack([(torch.isin(input_ids, ids) & line_start).any(1) for ids in sides], 1)  # [B, 2]
        missing = decided.any(2) & ~opened
        go = heading & opened.any(1) & missing.any(1)
        first = missing[:, 1].long()  # the right breast's line first, as the reports write them
        for side, ids in enumerate(sides):
            rows = (go & (first == side)).nonzero().squeeze(1)
            if len(rows):
                promote(scores, rows, ids[scores[rows][:, ids].argmax(1)], choice[rows])

    def headings_open_lines(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """In place: a section heading ("FINDINGS", "IMPRESSION", "OPINION") does not follow a
        word (traced on the demo: "Left Breast: calcifications or diffuse in aIMPRESSION: Right
        breast BI-RADS 1."); after a line break, a sentence's end or a plan it may."""
        device = scores.device
        mid_word = self.tokens.word_ends.to(device)[input_ids[:, -1]]
        for ids in (self.tokens.findings_heading, self.tokens.impression_headings):
            ids = ids.to(device)
            scores[:, ids] = scores[:, ids].masked_fill(mid_word[:, None], float("-inf"))

    def open_empty_lines(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        empty: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: the line of a breast stage 1 decided no finding for ("Right Breast: ...",
        ``empty``) opens with a negation ("No suspicious mass ...") or a category term, not with
        the description of a lesion: its finding term would be blocked at the end of the
        description and leave a broken sentence ("There is a 21 mm round high density  in ...").
        A colon after a category term names the category ("BI-RADS 2: Benign"), not a line
        (traced: "Right breast: BI-RADS 2: Negative", the negation written over the name)."""
        device = scores.device
        colons, categories = self.tokens.colons.to(device), self.tokens.categories.to(device)

        def heading_colon(at: int) -> torch.Tensor:  # [B] a colon at ``at`` (negative) not after a category
            colon = torch.isin(input_ids[:, at], colons)
            if input_ids.shape[1] > -at:
                colon &= ~torch.isin(input_ids[:, at - 1], categories)
            return colon

        colon = heading_colon(-1)
        if input_ids.shape[1] > 1:  # or after the heading's colon and a lone word boundary
            spaced = torch.isin(input_ids[:, -1], self.tokens.spaces.to(device))
            colon = colon | (spaced & heading_colon(-2))
        rows = (colon & empty & ~torch.isin(top, self.line_openers.to(device))).nonzero().squeeze(1)
        if len(rows):
            negations = self.tokens.negations.to(device)
            promote(scores, rows, negations[scores[rows][:, negations].argmax(1)], choice[rows])

    def block_descriptions(self, scores: torch.Tensor, described: torch.Tensor) -> None:
        """In place: a word that describes findings (``describes``: "oval", "circumscribed",
        "fine pleomorphic", "associated") only where the sentence may name one of them
        (``described``: ``[B, 7]``, its findings, those it may still name, or all in a negated
        sentence). Blocking the finding term alone let the decoder describe a mass stage 1 did
        not decide and then name the finding it had: "A 17 mm oval equal density calcifications
        with circumscribed margins" (demo), "There is associated mass" (no associated feature)."""
        describes = self.tokens.describes.to(scores.device)
        ids = describes.any(1).nonzero().squeeze(1)
        if len(ids):
            fits = (describes[ids][None] & described[:, None, :]).any(2)  # [B, K]
            scores[:, ids] = scores[:, ids].masked_fill(~fits, float("-inf"))

    def steer(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
        term_ids: torch.Tensor,
        allowed: torch.Tensor,
    ) -> None:
        """In place: where the decoder headed for a finding term that is blocked, it names the
        likeliest finding it may name there instead (``allowed``: ``[B, 7]``; if any), not
        whatever word came next; at a sentence's opening in the way that finding's sentence
        opens (``open_sentence``)."""
        headed = torch.isin(top, term_ids) & torch.isneginf(scores.gather(1, top[:, None]).squeeze(1))
        if not bool(headed.any()):
            return  # most steps
        if input_ids.shape[1]:
            headed &= ~self.open_sentence(input_ids, scores, headed, choice, allowed)
        best, at = scores[:, term_ids].max(1)
        rows = (headed & ~torch.isneginf(best)).nonzero().squeeze(1)
        if len(rows):
            promote(scores, rows, term_ids[at[rows]], choice[rows])

    def follow_article(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        wanted: torch.Tensor,
        term_ids: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place, where a finding left over (``wanted``: ``[B, K]`` over ``term_ids``) opens a
        sentence after an article ("A focal asymmetry", "An intramammary lymph node") and no mass
        is left: right after an article that one of its terms takes (``FindingTokens.term_article``:
        "An asymmetry", not "A asymmetry"), where the decoder heads for anything but such a term,
        the likeliest one follows; where the decoder heads for the article that none of the
        findings left opens with at a sentence's opening (``FindingTokens.article_of``), the
        other is written. Traced on Gemma 3 270M's
        reports of the knowledge benchmark: "A" opened for an asymmetry, then " 20 mm ..." (a
        mass's opening), and the mass already named was named again until the token limit (9 of
        231 reports); the tiny decoder's "A 8 mm oval ... mass" twice more where a lymph node was
        left ("An")."""
        if not bool(wanted.any()):
            return
        device = scores.device
        opens, article, _ = self.opening(input_ids)
        follows = self.tokens.term_article.to(device)[term_ids]  # [K]
        takes = self.tokens.article_of.to(device)[self.tokens.opener_of.to(device)[term_ids]]  # [K]
        fits = wanted & (follows[None] == article[:, None]) & (article >= 0)[:, None]
        follow = fits.any(1) & ~(fits & (term_ids[None] == top[:, None])).any(1)
        rows = follow.nonzero().squeeze(1)
        if len(rows):
            best = term_ids[scores[:, term_ids].masked_fill(~fits, float("-inf")).argmax(1)]
            spaces = self.tokens.spaces.to(device)
            if len(spaces):  # an atomic term follows a lone word boundary ("A", " ", "focal asymmetry")
                after_space = torch.isin(input_ids[:, -1], spaces)
                best = torch.where(after_space | self.tokens.spaced.to(device)[best], best, spaces[0])
            promote(scores, rows, best[rows], choice[rows])
        articles = self.tokens.articles.to(device)  # [2 (A, An), 2 (" A", "A")]
        heads = (articles[None] == top[:, None, None]) & (articles[None] >= 0)  # [B, 2, 2]
        kind, form = heads.any(2).long().argmax(1), heads.any(1).long().argmax(1)
        other = articles[1 - kind, form]
        taken = [(wanted & (takes[None] == k[:, None])).any(1) for k in (kind, 1 - kind)]
        swap = heads.flatten(1).any(1) & opens & (article < 0) & ~taken[0] & taken[1] & (other >= 0)
        rows = swap.nonzero().squeeze(1)
        if len(rows):
            promote(scores, rows, other[rows], choice[rows])

    def opening(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B]`` whether the next token opens a sentence (after a sentence's end, a heading's
        colon or a line break, and a lone word boundary if one follows); ``[B]`` the article
        (``ARTICLES`` index, -1: none) that opened the sentence the text ends with, and a lone
        word boundary if one follows ("Density: A" is a letter, not an article); ``[B]`` whether
        a word comes next on its own (after a lone word boundary or a line break; else after a
        space: " A")."""
        device = input_ids.device
        tokens = self.tokens
        stops, spaces = tokens.stops.to(device), tokens.spaces.to(device)
        padded = torch.cat([input_ids.new_full((input_ids.shape[0], 4), -1), input_ids], 1)
        last, before = padded[:, -1], padded[:, -2]
        spaced = torch.isin(last, spaces)

        def after_stop(at: int) -> torch.Tensor:  # the token at ``at`` (from the end) opens a sentence
            previous = padded[:, at - 1]
            return torch.isin(previous, stops) | (torch.isin(previous, spaces) & torch.isin(padded[:, at - 2], stops))

        opens = torch.isin(last, stops) | (spaced & torch.isin(before, stops))
        articles = tokens.articles.to(device)
        word = torch.where(spaced, before, last)
        written = ((word[:, None, None] == articles[None]) & (articles[None] >= 0)).any(2)  # [B, 2]
        written &= torch.where(spaced, after_stop(-2), after_stop(-1))[:, None]
        article = torch.where(written.any(1), written.long().argmax(1), -1)
        bare = spaced | torch.isin(last, tokens.line_breaks.to(device))
        return opens, article, bare

    def open_with(
        self,
        scores: torch.Tensor,
        rows: torch.Tensor,
        ids: torch.Tensor,
        bare: torch.Tensor,
        choice: torch.Tensor,
        inside: bool = False,
    ) -> None:
        """In place: ``rows`` write the openers ``ids`` (one each), or the article their finding's
        sentence opens with ("A", "An"; on its own where ``bare``, else after a space; ``inside``
        a sentence: " a", " an")."""
        device = scores.device
        takes = self.tokens.article_of.to(device)[self.tokens.opener_of.to(device)[ids]]
        if inside:
            article = self.tokens.inner_articles.to(device)[takes.clamp(min=0)]
        else:
            article = self.tokens.articles.to(device)[takes.clamp(min=0), bare.long()]
        spaces = self.tokens.spaces.to(device)
        if len(spaces):  # after "." or ":" an atomic term follows a lone word boundary
            ids = torch.where(bare | self.tokens.spaced.to(device)[ids], ids, spaces[0])
        promote(scores, rows, torch.where((takes >= 0) & (article >= 0), article, ids), choice[rows])

    def open_sentence(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        headed: torch.Tensor,
        choice: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """In place, for the rows that ``headed`` for a blocked finding term: at a sentence's
        opening the likeliest finding they may name opens its sentence as the reports do: a mass,
        an asymmetry and a lymph node with their article (``open_with``), a calcification with its
        morphology (``FindingTokens.openers``); after such an article a finding that takes it
        follows, a mass with its size ("A 12 mm ..."). Traced on the knowledge benchmark: the bare
        term ran into lists ("Right Breast: mass, suspicious calcifications or o'clock, or
        o'clock, ..."), and "A" followed by "mass" into "A mass, suspicious , or ...". Returns
        ``[B]``: the rows steered."""
        device = scores.device
        tokens = self.tokens
        opens, article, bare = self.opening(input_ids)
        openers = tokens.openers.to(device)
        finding = tokens.opener_of.to(device)[openers]
        follows = tokens.term_article.to(device)[openers]  # [K]
        may = allowed[:, finding]  # [B, K] ("round" opens calcifications, and describes a mass too)
        candidates = scores[:, openers].masked_fill(~may, float("-inf"))
        may &= ~torch.isneginf(candidates)
        steered = headed & opens & (article < 0) & may.any(1)
        rows = steered.nonzero().squeeze(1)
        if len(rows):
            self.open_with(scores, rows, openers[candidates[rows].argmax(1)], bare[rows], choice)
        fits = may & (follows[None] == article[:, None])
        after = headed & (article >= 0) & fits.any(1) & ~steered
        if not bool(after.any()):
            return steered
        best = openers[candidates.masked_fill(~fits, float("-inf")).argmax(1)]  # [B]
        mass = tokens.opener_of.to(device)[best] == MASS
        rows = (after & ~mass).nonzero().squeeze(1)
        if len(rows):
            promote(scores, rows, best[rows], choice[rows])
        for on_its_own, numbers in zip((False, True), tokens.numbers):
            rows = (after & mass & (bare == on_its_own)).nonzero().squeeze(1)
            if len(rows) and len(numbers):
                numbers = numbers.to(device)
                promote(scores, rows, numbers[scores[rows][:, numbers].argmax(1)], choice[rows])
        return steered | after

    def opened_as_mass(self, input_ids: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        """``[B]`` whether the sentence after ``stop`` (its latest end, 1-based position) opened
        with an article and a number ("A 12 mm ...", lone word boundaries aside), as a mass's
        sentence does: it names a mass, and describes nothing else (traced: "A 7 mm diffuse in
        the right axilla.", a calcification's distribution after a mass's opening)."""
        device = input_ids.device
        length = input_ids.shape[1]
        at = stop[:, None] + torch.arange(5, device=device)  # the sentence's first tokens
        first = input_ids.gather(1, at.clamp(max=length - 1)).masked_fill(at >= length, -1)
        articles = self.tokens.articles.to(device).flatten()
        words = ~torch.isin(first, self.tokens.spaces.to(device)) & (first >= 0)
        rank = words.long().cumsum(1).masked_fill(~words, 0)  # 1: the first word, 2: the second
        article = (torch.isin(first, articles[articles >= 0]) & (rank == 1)).any(1)
        number = (torch.isin(first, torch.cat(self.tokens.numbers).to(device)) & (rank == 2)).any(1)
        return article & number

    def hold_articles(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """In place: a sentence does not end right after its article ("A." , "An\n")."""
        device = scores.device
        _, article, _ = self.opening(input_ids)
        stops = self.tokens.stops.to(device)
        scores[:, stops] = scores[:, stops].masked_fill((article >= 0)[:, None], float("-inf"))

    def hold_sides(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        decided: torch.Tensor,
        unnamed: torch.Tensor,
        written: torch.Tensor,
        sided: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
    ) -> None:
        """In place: after finding terms in the current sentence (``written``: ``[B, 7]``), no side
        word of a breast stage 1 did not decide all of them for (when it decided them for the
        other); of two breasts that fit, the one whose findings are still ``unnamed``
        (``[B, 2, 7]``) when the other's were named ("There is a ... mass ... of the left breast"
        after the right one's); and a line that has named no breast yet (``sided``: ``[B]``) does
        not place them in "the breast" (the parser leaves such findings without a side, and no
        breast has them). Where the decoder headed (``top``) for a side word or "breast" that is
        blocked, it writes the side word of a breast that fits ("of the right breast", not "of
        the o'clock" or "in the either breast")."""

        def fitting(have: torch.Tensor) -> torch.Tensor:  # [B, 2]: the side has them all
            return (have | ~written[:, None]).all(2) & written.any(1)[:, None]

        fits, open_fits = fitting(decided), fitting(unnamed)
        fits = torch.where(open_fits.any(1, keepdim=True), open_fits, fits)
        device = scores.device
        sides = [ids.to(device) for ids in self.tokens.sides]
        for side, other in ((0, 1), (1, 0)):
            block = fits[:, other] & ~fits[:, side]
            scores[:, sides[side]] = scores[:, sides[side]].masked_fill(block[:, None], float("-inf"))
        unsided = written.any(1) & ~sided & torch.isin(input_ids[:, -1], self.tokens.the.to(device))
        breast = self.tokens.breast.to(device)
        scores[:, breast] = scores[:, breast].masked_fill(unsided[:, None], float("-inf"))
        best = torch.stack([scores[:, ids].max(1).values for ids in sides], 1)  # [B, 2] after the blocks
        pick = torch.where(fits.all(1), best.argmax(1), fits[:, 1].long())  # the fitting breast (of two, the likelier)
        self.place(input_ids, scores, torch.where(fits.any(1) & ~sided, pick, -1), top, choice)
        words = torch.cat([*sides, breast])
        headed = torch.isin(top, words) & torch.isneginf(scores.gather(1, top[:, None]).squeeze(1))
        rows = (headed & fits.any(1) & ~torch.isneginf(best.max(1).values)).nonzero().squeeze(1)
        for side, ids in enumerate(sides):
            mine = rows[pick[rows] == side]
            if len(mine):
                promote(scores, mine, ids[scores[mine][:, ids].argmax(1)], choice[mine])

    def place(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        side: torch.Tensor,
        top: torch.Tensor,
        choice: torch.Tensor,
        phrases: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        """In place: a sentence that named findings in a line that names no breast (``side``: the
        breast stage 1 decided them for, -1: none such) does not end before it names the breast:
        where the decoder would end it, " of the left" (right; ``phrases``, if given: a denial's
        " in the left") is written and the decoder goes on;
        where the decoder writes " of" itself ("... in the lower inner quadrant of"), " the left"
        follows. (" in the" was tried first: the decoder's own " in" ("in a regional
        distribution") then became the side, and the location was lost.)
        Traced on the knowledge benchmark: "A 15 mm oval high density skin thickening." leaves
        the finding without a side (the parser counts a miss and a false positive); blocking the
        sentence's end instead looped ("... middle depth breast at 8 calcifications or
        calcifications or ...")."""
        device = scores.device
        ends = torch.cat([self.tokens.periods, self.tokens.line_breaks]).to(device)
        ending = torch.isin(top, ends) & ~self.tokens.digit_ends.to(device)[input_ids[:, -1]]  # not "7.1"
        for s, phrase in enumerate(self.tokens.side_phrases if phrases is None else phrases):
            if phrase:  # empty: the tokenizer splits the side word, the rule is off for this side
                write_phrase(input_ids, scores, side == s, phrase, ending, top, choice)


class PlannedFindings(LogitsProcessor):
    """With a findings plan (``data.findings_plan``), the plan names exactly the findings stage 1
    decided (``decided``: ``[N, 2, 7]``), in the plan's order (left, then right, each in
    ``FINDINGS`` order): once the decoder is done with the plan's categories (its choice is a
    finding token or ``</plan>``), the next decided finding is written, then ``</plan>``. A
    decoder trained on plans that match their reports then words the report after its plan."""

    def __init__(self, finding_ids: list[int], brackets: tuple[int, int], decided: torch.Tensor):
        self.ids = torch.tensor(finding_ids, dtype=torch.long)
        self.opening, self.closing = brackets
        self.decided = decided.bool().flatten(1)  # [N, 14] in the plan's order

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not input_ids.shape[1]:
            return scores
        ids = self.ids.to(scores.device)
        decided = per_row(self.decided.to(scores.device), scores.shape[0])
        open_plan = (input_ids == self.opening).any(1) & ~(input_ids == self.closing).any(1)
        written = torch.isin(input_ids, ids).sum(1)
        choice, top = scores.max(1)
        done = torch.isin(top, ids) | (top == self.closing)  # the categories are written
        for row in (open_plan & done).nonzero().squeeze(1).tolist():
            wanted = decided[row].nonzero().squeeze(1).tolist()
            n = int(written[row])
            target = int(ids[wanted[n]]) if n < len(wanted) else self.closing
            scores[row] = float("-inf")  # the plan's next token is decided: nothing else
            scores[row, target] = choice[row]
        return scores
