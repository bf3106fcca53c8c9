"""Term-aware text normalisation: lexicon variants and BI-RADS notations to canonical forms.

Real report text is messy: a term can be split by a line break ("architectural\\ndistortion"),
two words can be glued together where a line break was lost ("architecturaldistortion",
"leftupper"), and a BI-RADS category can be written many ways, also as a list ("BIRADS: 3 and
5", "4a, 4b", "BIRADS-4c"). ``Normalizer`` rewrites all of these to the canonical forms the
tokenizer and the parser expect (``BI-RADS 4B``, ``architectural distortion``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from terminology.lexicon import DEFAULT_LEXICON, Lexicon, load_lexicon

ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "0": "0"}
_CATEGORY = r"(?:[0-6](?:\s?[abc])?|vi|iv|v|i{1,3})(?![\w])"
_NOT_A_MEASURE = r"(?!\s*(?:cm|mm|o'?\s?clock|%|[.:]\d))"
BIRADS_PATTERN = re.compile(
    r"(?:\bACR\s+)?\bBI[\s-]?RADS\b(?:\s*(?:assessment\s+)?category)?[\s:\-–=]*"
    rf"(?P<cat>{_CATEGORY}){_NOT_A_MEASURE}"
    rf"(?P<more>(?:\s*(?:,|and|&|/|or)\s*(?:{_CATEGORY}){_NOT_A_MEASURE})*)",
    re.IGNORECASE,
)
_LIST_ITEM = re.compile(_CATEGORY, re.IGNORECASE)
# "Category 0, additional views": a bare category is an assessment unless density is being described
BARE_CATEGORY = re.compile(
    rf"\b(?:assessment\s+)?category\s*[:\-]?\s*(?P<cat>[0-6](?:\s?[abc])?(?![\w])){_NOT_A_MEASURE}", re.IGNORECASE
)
_DENSITY_CONTEXT = re.compile(r"densit|composition|\bACR\b|dense|fatty|fibroglandular", re.IGNORECASE)
# Words of report text beyond the lexicon, for splitting words glued together by a lost line break.
REPORT_WORDS = (
    "left",
    "right",
    "upper",
    "lower",
    "inner",
    "outer",
    "central",
    "quadrant",
    "breast",
    "breasts",
    "axilla",
    "axillary",
    "nipple",
    "skin",
    "seen",
    "noted",
    "there",
    "is",
    "are",
    "no",
    "with",
    "and",
    "the",
    "in",
    "of",
    "mass",
    "masses",
    "calcification",
    "calcifications",
    "distortion",
    "architectural",
    "asymmetry",
    "focal",
    "lymph",
    "node",
    "nodes",
    "retraction",
    "thickening",
    "benign",
    "suspicious",
    "malignant",
    "lesion",
    "opacity",
    "margins",
    "margin",
    "spiculated",
    "irregular",
    "oval",
    "round",
    "dense",
    "fatty",
    "density",
    "findings",
    "impression",
    "composition",
    "bilateral",
    "clock",
    "anterior",
    "middle",
    "posterior",
    "depth",
    "region",
    "retroareolar",
    "subareolar",
    "tissue",
    "soft",
    "ill",
    "defined",
    "well",
    "partially",
    "obscured",
)


def canonical_birads(token: str) -> str | None:
    """``"4 b"`` -> ``"4B"``, ``"IV"`` -> ``"4"``; None if it is not a category."""
    t = token.lower().replace(" ", "")
    sub = t[-1] if t and t[-1] in "abc" and t not in ("i",) else ""
    num = t[:-1] if sub else t
    num = ROMAN.get(num, num)
    if num not in {"0", "1", "2", "3", "4", "5", "6"}:
        return None
    if sub and num != "4":
        return None
    return num + sub.upper()


_SENTENCE_OPENING = re.compile(r"(^|[.:]\s+)([a-z])", re.MULTILINE)


def sentence_case(text: str) -> str:
    """Each line and each sentence (after ". " or ": ") opened with a capital letter, as reports
    are written. The decoder learns normalised text, where a lexicon term is one lower-case unit
    wherever it stands: a sentence it opens reads "tissue diagnosis is recommended." or "fine
    pleomorphic calcifications are ..." (in all 462 test reports the tiny decoder and Gemma wrote
    in the knowledge benchmark, against none of the 231 references). Only a letter's case changes ("7.8 cm" has no
    space after its point): the parser and the NLG metrics read the text the same."""
    return _SENTENCE_OPENING.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _surface_pattern(surface: str) -> str:
    """A surface form whose words may be separated by any white space (a line break too)."""
    return r"\s+".join(re.escape(word) for word in surface.split())


@dataclass
class Normalizer:
    """Rewrites variants to canonical lexicon terms and BI-RADS notations to ``BI-RADS 4B``;
    joins terms split by line breaks and splits words glued together.

    ``keep_forms``: a term's other grammatical number stays as written ("small masses", "no
    suspicious calcification"): the text a decoder learns (``Normalizer.for_reports``). Without
    it (the parser) every form becomes its canonical term."""

    lexicon: Lexicon
    birads: bool = True
    keep_forms: bool = False
    _map: dict[str, str] = field(init=False, repr=False)
    _pattern: re.Pattern = field(init=False, repr=False)
    _words: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._map = {" ".join(k.split()): v for k, v in self.lexicon.surface_map(self.keep_forms).items()}
        alternation = "|".join(_surface_pattern(s) for s in sorted(self._map, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE)
        words = {w.lower() for s in self._map for w in re.findall(r"[a-z]+", s, re.IGNORECASE)}
        self._words = frozenset(words | set(REPORT_WORDS))

    @classmethod
    def default(cls) -> Normalizer:
        return cls(load_lexicon(DEFAULT_LEXICON))

    @classmethod
    def for_reports(cls, lexicon: Lexicon) -> Normalizer:
        """The normaliser of the report text a decoder learns: terms canonical, forms kept."""
        return cls(lexicon, keep_forms=True)

    def _birads(self, m: re.Match) -> str:
        cats = [canonical_birads(m.group("cat"))]
        cats += [canonical_birads(x.group(0)) for x in _LIST_ITEM.finditer(m.group("more") or "")]
        if any(c is None for c in cats):
            return m.group(0)
        return " and ".join(f"BI-RADS {c}" for c in cats)

    def _bare_category(self, m: re.Match) -> str:
        before = m.string[max(0, m.start() - 40) : m.start()]
        before = re.split(r"[.;\n]", before)[-1]
        cat = canonical_birads(m.group("cat"))
        if cat is None or _DENSITY_CONTEXT.search(before):
            return m.group(0)
        return f"BI-RADS {cat}"

    def _deglue(self, m: re.Match) -> str:
        """``architecturaldistortion`` -> ``architectural distortion`` when both halves are words
        of the lexicon or of report text and the whole is not."""
        word = m.group(0)
        low = word.lower()
        if low in self._words:
            return word
        for cut in range(3, len(low) - 2):
            if low[:cut] in self._words and low[cut:] in self._words:
                return f"{word[:cut]} {word[cut:]}"
        return word

    def __call__(self, text: str) -> str:
        text = re.sub(r"[A-Za-z]{7,}", self._deglue, text)
        if self.birads:
            text = BIRADS_PATTERN.sub(self._birads, text)
            text = BARE_CATEGORY.sub(self._bare_category, text)
        return self._pattern.sub(lambda m: self._map[" ".join(m.group(0).lower().split())], text)
