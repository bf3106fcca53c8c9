"""Term-aware text normalisation: lexicon variants and BI-RADS notations → canonical forms."""

from __future__ import annotations

import re
from dataclasses import dataclass

from terminology.lexicon import DEFAULT_LEXICON, Lexicon, load_lexicon

ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "0": "0"}
BIRADS_PATTERN = re.compile(
    r"(?:\bACR\s+)?\bBI[\s-]?RADS\b(?:\s*(?:assessment\s+)?category)?[\s:]*"
    r"(?P<cat>[0-6](?:\s?[abc])?(?![\w])|(?:vi|iv|v|i{1,3})(?:\s?[abc])?(?![\w]))",
    re.IGNORECASE,
)


def canonical_birads(token: str) -> str | None:
    """``"4 b"`` → ``"4B"``, ``"IV"`` → ``"4"``; None if it is not a category."""
    t = token.lower().replace(" ", "")
    sub = t[-1] if t and t[-1] in "abc" and t not in ("i",) else ""
    num = t[:-1] if sub else t
    num = ROMAN.get(num, num)
    if num not in {"0", "1", "2", "3", "4", "5", "6"}:
        return None
    if sub and num != "4":
        return None
    return num + sub.upper()


@dataclass
class Normalizer:
    """Rewrites variants to canonical lexicon terms; optional BI-RADS notation rewriting."""

    lexicon: Lexicon
    birads: bool = True

    def __post_init__(self) -> None:
        self._map = self.lexicon.surface_map()
        alternation = "|".join(re.escape(s) for s in sorted(self._map, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE)

    @classmethod
    def default(cls) -> Normalizer:
        return cls(load_lexicon(DEFAULT_LEXICON))

    def _birads(self, m: re.Match) -> str:
        cat = canonical_birads(m.group("cat"))
        return f"BI-RADS {cat}" if cat else m.group(0)

    def __call__(self, text: str) -> str:
        if self.birads:
            text = BIRADS_PATTERN.sub(self._birads, text)
        return self._pattern.sub(lambda m: self._map[m.group(0).lower()], text)
