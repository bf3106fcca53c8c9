"""Rule-based English mammography report parser (spaCy tokenisation + lexicon + ConText rules).

Output: a ``StructuredReport`` (docs/design.md section 5): density, BI-RADS per side and exam,
findings per side (L, R, U) with states pos / neg / unc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import spacy

from mammorg.labels import FINDINGS, SIDES, most_severe
from mammorg.schema import REPORT_SIDES, StructuredReport
from terminology.lexicon import load_lexicon
from terminology.normalize import Normalizer, canonical_birads

NEG_PRE = (
    r"\bno\b|\bnot\b|\bwithout\b|\bfree of\b|\bnegative for\b|\bno evidence of\b|"
    r"\bnor\b|\babsence of\b|\bneither\b|\bruled out\b|\bresolved\b"
)
NEG_POST = (
    r"\b(?:is|are|was|were)?\s*(?:not (?:seen|identified|present|demonstrated|visualized|"
    r"noted)|absent|resolves?|resolved|disappears?|ruled out)\b"
)
UNC_PRE = (
    r"\bpossible\b|\bpossibly\b|\bprobable\b(?! ?benign)|\bquestionable\b|\bmay represent\b|"
    r"\bcould represent\b|\bindeterminate\b|\bequivocal\b|\bsuggestive of\b|\bconcerning for\b"
)
UNC_POST = (
    r"\bcannot be (?:excluded|ruled out)\b|\bcan not be excluded\b|\bnot excluded\b|"
    r"\bindeterminate\b|\bof uncertain significance\b"
)
TERMINATORS = re.compile(
    r"\bbut\b|\bhowever\b|\balthough\b|\bexcept\b|;|\bwith\b(?= "
    r"(?:an?|associated)\b)",
    re.IGNORECASE,
)
SIDE_WORDS = re.compile(
    r"\b(?P<side>right|left|rt|lt|bilateral(?:ly)?|both breasts|both sides|"
    r"either breast|each breast|both)\b",
    re.IGNORECASE,
)
HEADING = re.compile(
    r"^\s*(?P<head>right breast|left breast|right|left|rt|lt|r|l|bilateral"
    r"|findings|impression|opinion|assessment|conclusion|birads|bi-rads|"
    r"breast composition|composition|recommendation|indication|technique|"
    r"comparison)\s*[:\-]",
    re.IGNORECASE,
)
DENSITY_PATTERNS = (
    re.compile(r"\bACR\s*[:\-]?\s*(?:density\s*)?(?P<v>[abcd1-4])\b(?!\s*[-]?\s*BI)", re.IGNORECASE),
    re.compile(
        r"\b(?:breast\s+)?density\s*(?:category|type|pattern)?\s*[:\-]?\s*(?P<v>[abcd])\b", re.IGNORECASE
    ),
    re.compile(r"\b(?:category|type|pattern)\s*(?P<v>[abcd])\s*(?:breast\s*)?density\b", re.IGNORECASE),
)
PRIOR = re.compile(
    r"\b(?:unchanged|stable|new since|compared (?:to|with) (?:the )?prior|"
    r"since the prior|interval (?:increase|decrease|change|development)|"
    r"previously seen|prior (?:study|exam|mammogram)s?)\b",
    re.IGNORECASE,
)
BOILERPLATE = re.compile(
    r"which (?:may|could|can) obscure (?:small )?(?:mass|lesion)(?:es|s)?", re.IGNORECASE
)
SIDE_BIRADS = re.compile(
    r"\b(?P<side>right|left)\s*[:\-]?\s*(?P<cat>[0-6](?:\s?[abc])?)(?![\w.])", re.IGNORECASE
)
BILATERAL_EXAM = re.compile(r"\bbilateral (?:screening |diagnostic )?mammogra", re.IGNORECASE)
BIRADS_CANON = re.compile(r"BI-RADS (?P<cat>[0-6][ABC]?)\b")


@dataclass(frozen=True)
class _Rules:
    normalizer: Normalizer
    finding_pattern: re.Pattern
    finding_of: dict
    density_of: dict
    nlp: Any


@lru_cache(maxsize=1)
def _rules() -> _Rules:
    lexicon = load_lexicon()
    finding_of = {t.term: t.label["finding"] for t in lexicon.terms if "finding" in t.label}
    density_of = {t.term: t.label["density"] for t in lexicon.terms if "density" in t.label}
    alternation = "|".join(re.escape(t) for t in sorted(finding_of, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return _Rules(Normalizer(lexicon), pattern, finding_of, density_of, nlp)


def _side_of(word: str) -> tuple[str, ...]:
    w = word.lower()
    if w in ("right", "rt", "r"):
        return ("R",)
    if w in ("left", "lt", "l"):
        return ("L",)
    if w.startswith(("bilateral", "both", "either", "each")):
        return ("L", "R")
    return ()


def _nearest_side(sentence: str, pos: int) -> tuple[str, ...]:
    best: tuple[str, ...] = ()
    best_dist: int | None = None
    for m in SIDE_WORDS.finditer(sentence):
        dist = abs(m.start() - pos)
        if best_dist is None or dist < best_dist:
            best, best_dist = _side_of(m.group("side")), dist
    return best


def _clause(sentence: str, start: int, end: int) -> tuple[str, str]:
    """Text before and after a term, cut at the nearest scope terminators."""
    before, after = sentence[:start], sentence[end:]
    cuts = [m.end() for m in TERMINATORS.finditer(before)]
    if cuts:
        before = before[cuts[-1] :]
    m = TERMINATORS.search(after)
    if m:
        after = after[: m.start()]
    return before, after


def _state(sentence: str, start: int, end: int) -> str:
    before, after = _clause(sentence, start, end)
    after_short = after[:60]
    if re.search(NEG_PRE, before, re.IGNORECASE) or re.search(NEG_POST, after_short, re.IGNORECASE):
        return "neg"
    if re.search(UNC_PRE, before, re.IGNORECASE) or re.search(UNC_POST, after, re.IGNORECASE):
        return "unc"
    return "pos"


_PRIORITY = {"pos": 2, "unc": 1, "neg": 0}


def _merge(findings: dict, side: str, finding: str, state: str) -> None:
    current = findings[side].get(finding)
    if current is None or _PRIORITY[state] > _PRIORITY[current]:
        findings[side][finding] = state


def _density(text: str, rules: _Rules) -> str | None:
    for pattern in DENSITY_PATTERNS:
        m = pattern.search(text)
        if m:
            v = m.group("v").lower()
            return "abcd"[int(v) - 1] if v.isdigit() else v
    for term, value in rules.density_of.items():
        if term in text:
            return value
    return None


def _sentences(text: str, rules: _Rules) -> list[tuple[str, tuple[str, ...]]]:
    """(sentence, context sides) per sentence. Headings set the side context; within a line, a
    sentence without a side word inherits the side of the sentence before it."""
    out: list[tuple[str, tuple[str, ...]]] = []
    context: tuple[str, ...] = ()
    for line in text.splitlines():
        head = HEADING.match(line)
        if head:
            context = _side_of(head.group("head").split()[0])
        carried = context
        for sent in rules.nlp(line).sents:
            if not sent.text.strip():
                continue
            out.append((sent.text, carried))
            sides = {s for m in SIDE_WORDS.finditer(sent.text) for s in _side_of(m.group("side"))}
            if sides:
                carried = tuple(sorted(sides))
    return out


def parse_report(text: str) -> StructuredReport:
    """Structured report from free text (docs/design.md section 5)."""
    rules = _rules()
    norm = BOILERPLATE.sub("", rules.normalizer(text or ""))
    bilateral_exam = bool(BILATERAL_EXAM.search(norm))
    findings: dict[str, dict] = {"L": {}, "R": {}, "U": {}}
    side_birads: dict[str, list[str]] = {"L": [], "R": []}
    all_birads: list[str] = []
    for sentence, context in _sentences(norm, rules):
        for m in BIRADS_CANON.finditer(sentence):
            cat = m.group("cat")
            all_birads.append(cat)
            sides = _nearest_side(sentence[: m.start()], m.start()) or context
            if len(sides) == 1:
                side_birads[sides[0]].append(cat)
        if "BI-RADS" in sentence:
            for m in SIDE_BIRADS.finditer(sentence):
                cat = canonical_birads(m.group("cat"))
                if cat:
                    side_birads[_side_of(m.group("side"))[0]].append(cat)
                    all_birads.append(cat)
        for m in rules.finding_pattern.finditer(sentence):
            finding = rules.finding_of[m.group(0)]
            state = _state(sentence, m.start(), m.end())
            sides = _nearest_side(sentence, m.start()) or context
            if not sides:
                sides = ("L", "R") if bilateral_exam and state == "neg" else ("U",)
            for side in sides:
                _merge(findings, side, finding, state)
    exam = most_severe(all_birads)
    birads = {s: most_severe(v) for s, v in side_birads.items()}
    bilateral_without_side = (
        not side_birads["L"]
        and not side_birads["R"]
        and not any(st == "pos" for s in SIDES for st in findings[s].values())
    )
    if exam is not None and bilateral_without_side and not findings["U"]:
        birads = {"L": exam, "R": exam}
    return StructuredReport(
        _density(norm, rules),
        {**birads, "exam": exam},
        {s: {f: findings[s][f] for f in FINDINGS if f in findings[s]} for s in REPORT_SIDES},
    )


def mentions_prior(text: str) -> bool:
    """Whether a report compares with prior exams ("unchanged", "stable", "new since" ...)."""
    return bool(PRIOR.search(text or ""))
