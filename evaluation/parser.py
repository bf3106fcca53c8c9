"""Rule-based English mammography report parser (spaCy sentences + lexicon + ConText-style rules).

Output: a ``StructuredReport`` (docs/design.md, section 5): density, BI-RADS per side and for the
exam, findings per side (L, R, U) as pos / neg / unc, and finding locations (quadrant, clock
position, depth, distance from the nipple).

Steps: normalise the text (``terminology.Normalizer``: lexicon variants, BI-RADS notations and
lists, terms split by line breaks, words glued together) -> sentences with the side context of
their heading -> density, stated BI-RADS categories, findings and their locations -> the per-side
BI-RADS rule:

1. a category the text gives next to a side (same sentence, or under that side's heading) is
   that side's;
2. otherwise one category for an exam whose positive or uncertain findings are all on one side
   belongs to that side;
3. otherwise one category for an exam with no positive or uncertain finding applies to both
   sides, unless the report never names a side (a single-image report); so does a benign
   category (1, 2) for findings in both breasts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mammorg.labels import FINDINGS, SIDES, most_severe
from mammorg.schema import REPORT_SIDES, StructuredReport
from terminology.lexicon import load_lexicon
from terminology.normalize import Normalizer, canonical_birads

NEG_PRE = re.compile(
    r"\bno\b|\bnot\b|\bwithout\b|\bfree of\b|\bnegative for\b|\bno evidence of\b|\bnor\b|\babsence of\b|"
    r"\bneither\b|\bruled out\b|\bresolved\b",
    re.IGNORECASE,
)
NEG_POST = re.compile(
    r"\b(?:is|are|was|were)?\s*(?:not (?:seen|identified|present|demonstrated|visualized|noted)|absent|"
    r"resolves?|resolved|disappears?|ruled out)\b",
    re.IGNORECASE,
)
UNC_PRE = re.compile(
    r"\bpossible\b|\bpossibly\b|\bprobable\b(?! ?benign)|\bquestionable\b|\bmay represent\b|\bcould represent\b|"
    r"\bindeterminate\b|\bequivocal\b|\bsuggestive of\b|\bconcerning for\b",
    re.IGNORECASE,
)
UNC_POST = re.compile(
    r"\bcannot be (?:excluded|ruled out)\b|\bcan not be excluded\b|\bnot excluded\b|\bindeterminate\b|"
    r"\bof uncertain significance\b",
    re.IGNORECASE,
)
TERMINATORS = re.compile(
    r"\bbut\b|\bhowever\b|\balthough\b|\bexcept\b|;|\bwith\b(?= (?:an?|associated)\b)", re.IGNORECASE
)
SIDE_WORDS = re.compile(
    r"\b(?P<side>right|left|rt|lt|[rl](?=\.?\s+breast)|bilateral(?:ly)?|both breasts|both sides|"
    r"either breast|each breast|both)\b",
    re.IGNORECASE,
)
# a sentence of features associated with the finding before it: "There is associated skin thickening."
ASSOCIATED = re.compile(r"\s*(?:there (?:is|are) |with )?(?:an? )?associated\b", re.IGNORECASE)
HEADING = re.compile(
    r"^\s*(?P<head>right breast|left breast|[rl]\.?\s+breast|right|left|rt|lt|r|l|bilateral|"
    r"findings|impression|overall|"
    r"opinion|assessment|conclusion|birads|bi-rads|breast composition|composition|"
    r"recommendation|indication|technique|comparison|breast density|density|axillae|axillas?)\s*[:\-]",
    re.IGNORECASE,
)
DENSITY_PATTERNS = (
    re.compile(
        r"\bACR\s*[:\-]?\s*(?:density\s*)?(?:category\s*|type\s*)?(?P<v>[abcd1-4])\b(?!\s*[-]?\s*BI)",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:breast\s+)?density\s*(?:category|type|pattern)?\s*[:\-]?\s*(?P<v>[abcd])\b", re.IGNORECASE),
    re.compile(r"\b(?:category|type|pattern)\s*(?P<v>[abcd])\s*(?:breast\s*)?density\b", re.IGNORECASE),
    re.compile(
        r"\b(?:breast\s+)?composition\s*(?:category|type)?\s*[:\-]?\s*(?P<v>[abcd])\b(?=\s*(?:[.,;()\-]|$))",
        re.IGNORECASE | re.MULTILINE,
    ),
    re.compile(r"\bdense\b[^.\n]{0,30}\(\s*(?:category|type)\s*(?P<v>[abcd])\s*\)", re.IGNORECASE),
)
PRIOR = re.compile(
    r"\b(?:unchanged|stable|new since|compared (?:to|with) (?:the )?prior|since the prior|"
    r"interval (?:increase|decrease|change|development)|previously seen|prior (?:study|exam|"
    r"mammogram)s?)\b",
    re.IGNORECASE,
)
BOILERPLATE = re.compile(r"which (?:may|could|can) obscure (?:small )?(?:mass|lesion)(?:es|s)?", re.IGNORECASE)
SIDE_BIRADS = re.compile(r"\b(?P<side>right|left)\s*[:\-]?\s*(?P<cat>[0-6](?:\s?[abc])?)(?!\w|\.\d)", re.IGNORECASE)
FOLLOWING_SIDE = re.compile(r"\W{0,3}\(?(?P<side>right|left)\b", re.IGNORECASE)
BIRADS_CANON = re.compile(r"BI-RADS (?P<cat>[0-6][ABC]?)\b")
# "Skin and nipple - no abnormality", "skin, nipple, and pectoral muscle appear normal"
ANATOMY_NORMAL = re.compile(
    r"^(?P<parts>(?:\W*(?:and\s+)?(?:skin|nipples?|pectoral muscle|areola)\b)+)\W*"
    r"(?:(?:is|are)\s+)?(?:appears?\s+normal|normal|no abnormality|unremarkable|"
    r"not involved|intact)\b",
    re.IGNORECASE,
)
QUADRANT = re.compile(
    r"\b(?P<q>upper outer quadrant|upper inner quadrant|lower outer quadrant|lower inner quadrant|"
    r"(?:upper|lower|inner|outer|central) (?:central )?quadrant|retroareolar|periareolar|"
    r"axillary tail|central)\b",
    re.IGNORECASE,
)
CLOCK = re.compile(r"\b(?P<h>1[0-2]|[1-9])(?::[03]0)?\s*o'clock\b", re.IGNORECASE)
DEPTH = re.compile(r"\b(?P<d>anterior|middle|mid|posterior)(?:\s+(?:depth|third|aspects?))\b", re.IGNORECASE)
DISTANCE = re.compile(
    r"\b(?P<cm>\d+(?:\.\d+)?)\s*cm\s+from\s+(?:the\s+)?nipple\b|\bFN\s*(?P<fn>\d+(?:\.\d+)?)\s*cm\b",
    re.IGNORECASE,
)
_PRIORITY = {"pos": 2, "unc": 1, "neg": 0}
# a line break inside a sentence: the next line goes on with a preposition or conjunction
_WRAPPED = re.compile(
    r"(?<![.:;!?\n])[ \t]*\n[ \t]*(?=(?:in|at|of|on|with|within|and|or|to|from|near|adjacent|"
    r"measuring|which)\b)"
)


@dataclass(frozen=True)
class _Rules:
    normalizer: Normalizer
    finding_pattern: re.Pattern
    finding_of: dict[str, str]
    density_of: dict[str, str]
    nlp: Any


@lru_cache(maxsize=1)
def _rules() -> _Rules:
    lexicon = load_lexicon()
    finding_of = {t.term: t.label["finding"] for t in lexicon.terms if "finding" in t.label}
    density_of = {t.term: t.label["density"] for t in lexicon.terms if "density" in t.label}
    alternation = "|".join(re.escape(t) for t in sorted(finding_of, key=len, reverse=True))
    import spacy  # here, not at import: reading the module stays cheap

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return _Rules(
        Normalizer(lexicon), re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])"), finding_of, density_of, nlp
    )


@dataclass
class _Sentence:
    text: str
    heading: tuple[str, ...]  # sides of the line's heading (or of an earlier heading line)
    carried: tuple[str, ...]  # sides the sentence inherits from the sentence before it on its line


@dataclass
class _Reading:
    findings: dict[str, dict[str, str]] = field(default_factory=lambda: {s: {} for s in REPORT_SIDES})
    side_birads: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SIDES})
    exam_birads: list[str] = field(default_factory=list)
    locations: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, side: str, finding: str, state: str) -> None:
        current = self.findings[side].get(finding)
        if current is None or _PRIORITY[state] > _PRIORITY[current]:
            self.findings[side][finding] = state


def side_of(word: str) -> tuple[str, ...]:
    w = word.lower()
    if w in ("right", "rt", "r"):
        return ("R",)
    if w in ("left", "lt", "l"):
        return ("L",)
    if w.startswith(("bilateral", "both", "either", "each")):
        return ("L", "R")
    return ()


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


def _nearest_side(sentence: str, start: int, end: int) -> tuple[str, ...]:
    """The side named closest to a term, preferring side words of the term's own clause."""
    before, after = _clause(sentence, start, end)
    lo, hi = start - len(before), end + len(after)
    best: tuple[str, ...] = ()
    best_key: tuple[int, int] | None = None
    for m in SIDE_WORDS.finditer(sentence):
        outside = int(m.end() <= lo or m.start() >= hi)
        key = (outside, abs(m.start() - start))
        if best_key is None or key < best_key:
            best, best_key = side_of(m.group("side")), key
    return best


def _state(sentence: str, start: int, end: int) -> str:
    before, after = _clause(sentence, start, end)
    if NEG_PRE.search(before) or NEG_POST.search(after[:60]):
        return "neg"
    if UNC_PRE.search(before) or UNC_POST.search(after):
        return "unc"
    return "pos"


def _density(text: str, rules: _Rules) -> str | None:
    for pattern in DENSITY_PATTERNS:
        m = pattern.search(text)
        if m:
            v = m.group("v").lower()
            return "abcd"[int(v) - 1] if v.isdigit() else v
    found = [(text.find(term), value) for term, value in rules.density_of.items() if term in text]
    return min(found)[1] if found else None


def _sentences(text: str, rules: _Rules) -> list[_Sentence]:
    """Sentences with their side context: a heading line ("Right breast:") sets it for the lines
    below until the next section heading; within a line, a sentence without a side word also
    inherits the side of the sentence before it, and so does one of associated features on the
    next line ("... mass ... of the right breast." / "There is associated skin thickening.")."""
    out: list[_Sentence] = []
    context: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()  # the sides of the latest sentence that named one, in this section
    for line in text.splitlines():
        head = HEADING.match(line)
        if head:
            context = side_of(head.group("head").split()[0])
            previous = ()
        elif line.lstrip().startswith("BI-RADS"):  # an assessment line is a section of its own
            context = previous = ()
        carried = context
        for sent in rules.nlp(line).sents:
            if not sent.text.strip():
                continue
            sides = tuple(sorted({s for m in SIDE_WORDS.finditer(sent.text) for s in side_of(m.group("side"))}))
            if not sides and not carried and ASSOCIATED.match(sent.text):
                carried = previous
            out.append(_Sentence(sent.text, context, carried))
            if sides:
                carried = previous = sides
    return out


def _assessments(s: _Sentence, reading: _Reading) -> None:
    """Stated categories: for a side when named in the sentence or by its heading, else the exam's."""
    previous_end = 0
    for m in BIRADS_CANON.finditer(s.text):
        cat = m.group("cat")
        reading.exam_birads.append(cat)
        sides, previous_end = _category_side(s, previous_end, m.start(), m.end())
        if len(sides) == 1:
            reading.side_birads[sides[0]].append(cat)
    if "BI-RADS" in s.text:  # "BI-RADS right 0, left 1"
        for m in SIDE_BIRADS.finditer(s.text):
            cat = canonical_birads(m.group("cat"))
            if cat:
                reading.side_birads[side_of(m.group("side"))[0]].append(cat)
                reading.exam_birads.append(cat)


def _category_side(s: _Sentence, previous_end: int, start: int, end: int) -> tuple[tuple[str, ...], int]:
    """The side of a stated category and where its statement ends: the side named since the
    previous category ("right BI-RADS 5"), else one named right after it ("BI-RADS 5 left"),
    else the side named last before it, else the heading's."""
    since = [side_of(w.group("side")) for w in SIDE_WORDS.finditer(s.text[previous_end:start])]
    if since:
        return since[-1], end
    if after := FOLLOWING_SIDE.match(s.text[end:]):
        return side_of(after.group("side")), end + after.end()
    named = [side_of(w.group("side")) for w in SIDE_WORDS.finditer(s.text[:start])]
    return (named[-1] if named else s.heading), end


def _anatomy_normal(s: _Sentence, reading: _Reading, sides: tuple[str, ...]) -> None:
    """ "Skin and nipple appear normal": no skin thickening, no nipple retraction."""
    m = ANATOMY_NORMAL.match(s.text.strip())
    if not m:
        return
    parts = m.group("parts").lower()
    for word, finding in (("skin", "skin_thickening"), ("nipple", "nipple_retraction")):
        if word in parts:
            for side in sides:
                reading.merge(side, finding, "neg")


def _location(sentence: str, side: str, finding: str) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if m := QUADRANT.search(sentence):
        out["quadrant"] = m.group("q").lower()
    if m := CLOCK.search(sentence):
        out["clock"] = int(m.group("h"))
    if m := DEPTH.search(sentence):
        out["depth"] = {"mid": "middle"}.get(m.group("d").lower(), m.group("d").lower())
    if m := DISTANCE.search(sentence):
        out["distance_cm"] = float(m.group("cm") or m.group("fn"))
    return {"side": side, "finding": finding, **out} if out else None


def _combine(before: str | None, state: str) -> str:
    """Two mentions in one sentence: doubt about a present finding makes it uncertain, else the
    stronger state (present over uncertain over absent) holds."""
    if before is None:
        return state
    if {before, state} == {"pos", "unc"}:
        return "unc"
    return max(before, state, key=_PRIORITY.__getitem__)


def _findings(s: _Sentence, reading: _Reading, rules: _Rules, bilateral_exam: bool) -> None:
    """Findings of one sentence. Two mentions of one finding on one side in a sentence combine
    with doubt winning ("a soft tissue density which may represent a mass": uncertain)."""
    mentions: dict[tuple[str, str], str] = {}
    for m in rules.finding_pattern.finditer(s.text):
        finding = rules.finding_of[m.group(0)]
        state = _state(s.text, m.start(), m.end())
        sides = _nearest_side(s.text, m.start(), m.end()) or s.carried
        if not sides:
            sides = ("L", "R") if bilateral_exam and state == "neg" else ("U",)
        for side in sides:
            mentions[(side, finding)] = _combine(mentions.get((side, finding)), state)
    for (side, finding), state in mentions.items():
        reading.merge(side, finding, state)
        if state != "neg" and (loc := _location(s.text, side, finding)) is not None and loc not in reading.locations:
            reading.locations.append(loc)
    if not rules.finding_pattern.search(s.text):
        default = ("L", "R") if bilateral_exam else ("U",)
        _anatomy_normal(s, reading, s.carried or default)


def _side_birads(reading: _Reading, exam: str | None, names_a_side: bool) -> dict[str, str | None]:
    """The per-side rule of the module docstring."""
    birads = {s: most_severe(v) for s, v in reading.side_birads.items()}
    if exam is None or any(birads.values()):
        return birads
    flagged = {s for s in REPORT_SIDES for v in reading.findings[s].values() if v in ("pos", "unc")}
    if flagged and flagged <= set(SIDES) and len(flagged) == 1:
        return {s: exam if s in flagged else None for s in SIDES}
    benign_both = flagged == set(SIDES) and exam in ("1", "2")  # benign findings in both breasts
    if (not flagged and names_a_side) or benign_both:
        return dict.fromkeys(SIDES, exam)
    return birads


def _unwrap(text: str) -> str:
    """Join a line wrapped mid-sentence to the next (a line not ending a sentence or a heading,
    followed by a line that starts in lower case)."""
    return _WRAPPED.sub(" ", text)


def clean(text: str, rules: _Rules | None = None) -> str:
    """The text as the parser reads it: line ends unified, terms and notations canonical."""
    rules = rules or _rules()
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    return BOILERPLATE.sub("", rules.normalizer(_unwrap(text)))


def parse_report(text: str) -> StructuredReport:
    """Structured report from free text (see the module docstring)."""
    rules = _rules()
    norm = clean(text, rules)
    names_a_side = bool(SIDE_WORDS.search(norm))
    bilateral_exam = names_a_side
    reading = _Reading()
    for sentence in _sentences(norm, rules):
        _assessments(sentence, reading)
        _findings(sentence, reading, rules, bilateral_exam)
    exam = most_severe(reading.exam_birads)
    birads = _side_birads(reading, exam, names_a_side)
    findings = {s: {f: reading.findings[s][f] for f in FINDINGS if f in reading.findings[s]} for s in REPORT_SIDES}
    return StructuredReport(_density(norm, rules), {**birads, "exam": exam}, findings, reading.locations)


def mentions_prior(text: str) -> bool:
    """Whether a report compares with prior exams ("unchanged", "stable", "new since" ...)."""
    return bool(PRIOR.search(text or ""))
