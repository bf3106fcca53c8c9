"""Loading and validating the BI-RADS lexicon data file."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from mammorg.io import MammorgError

DEFAULT_LEXICON = Path(__file__).with_name("lexicon.yaml")


@dataclass(frozen=True)
class Term:
    term: str
    category: str
    variants: tuple[str, ...] = ()
    label: dict = field(default_factory=dict, hash=False, compare=False)
    forms: tuple[str, ...] = ()  # the term in its other grammatical number ("masses" for "mass")

    @property
    def spellings(self) -> tuple[str, ...]:
        """The term and its forms: the spellings a tokenizer keeps whole."""
        return (self.term, *self.forms)


@dataclass(frozen=True)
class Lexicon:
    terms: tuple[Term, ...]
    categories: tuple[str, ...]

    def canonical_terms(self) -> list[str]:
        return [t.term for t in self.terms]

    def atomic_terms(self) -> list[str]:
        """Every term a tokenizer keeps whole: the canonical terms and their other forms."""
        return [s for t in self.terms for s in t.spellings]

    def surface_map(self, keep_forms: bool = False) -> dict[str, str]:
        """Lower-cased variant, form or canonical term → canonical term; with ``keep_forms`` a
        form maps to itself as the lexicon spells it ("masses" stays plural)."""
        out = {}
        for t in self.terms:
            out[t.term.lower()] = t.term
            for v in t.variants:
                out[v.lower()] = t.term
            for f in t.forms:
                out[f.lower()] = f if keep_forms else t.term
        return out


def validate(raw: dict, source: Path) -> Lexicon:
    categories = tuple(raw.get("categories") or ())
    seen: dict[str, str] = {}
    terms = []
    for item in raw.get("terms") or []:
        t = Term(
            term=str(item["term"]),
            category=str(item["category"]),
            variants=tuple(str(v) for v in item.get("variants") or ()),
            label=dict(item.get("label") or {}),
            forms=tuple(str(f) for f in item.get("forms") or ()),
        )
        if t.category not in categories:
            raise MammorgError(f"{source}: term {t.term!r} has unknown category {t.category!r}")
        for surface in (*t.spellings, *t.variants):
            key = surface.lower()
            if key in seen and seen[key] != t.term:
                raise MammorgError(f"{source}: {surface!r} is a variant of both {seen[key]!r} and {t.term!r}")
            seen[key] = t.term
        terms.append(t)
    if not terms:
        raise MammorgError(f"{source}: no terms")
    return Lexicon(terms=tuple(terms), categories=categories)


@lru_cache(maxsize=8)
def load_lexicon(path: str | Path = DEFAULT_LEXICON) -> Lexicon:
    """Load and validate a lexicon file (cached per path)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MammorgError(f"{path}: cannot read lexicon ({exc})") from None
    return validate(raw, path)
