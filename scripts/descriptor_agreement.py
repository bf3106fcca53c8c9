"""Do generated reports describe and place findings as the references do? (analysis for issue #17)

Two scores of generated reports against reference reports, both micro-F1 over exams:

- descriptors: the lexicon's descriptor terms (mass shape, margin and density; calcification
  morphology and distribution; variants read as their term) per breast. A sentence that names one
  breast (the parser's side words) sets it for the sentences after it until another is named; a
  term before any is ``U``.
- clock positions: (breast, finding, clock position) of the parser's finding locations.

Also counts the clock positions written, per hour (a decoder that cannot spell a position shows
here: Gemma 3 once wrote no position above 9). Prints one JSON line per generated file.

Usage: python scripts/descriptor_agreement.py REFERENCES.jsonl GENERATED.jsonl [GENERATED.jsonl ...]
(both JSONL with ``{"id", "text"}``, as ``mammorg stage2 generate`` writes them).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from evaluation.parser import SIDE_WORDS, parse_report, side_of
from terminology.lexicon import load_lexicon

DESCRIPTORS = ("mass_shape", "mass_margin", "mass_density", "calc_benign", "calc_suspicious", "calc_distribution")
SENTENCE = re.compile(r"(?<=[.:])\s+|\n")


def descriptor_pattern() -> tuple[re.Pattern, dict[str, str]]:
    """A whole-word pattern of every descriptor spelling (longest first) and spelling -> term,
    from the lexicon's surface map (the parser's normaliser reads the same variants)."""
    lexicon = load_lexicon()
    terms = {t.term for t in lexicon.terms if t.category in DESCRIPTORS}
    term_of = {spelling: term for spelling, term in lexicon.surface_map().items() if term in terms}
    words = sorted(term_of, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"), term_of


def descriptors(text: str, pattern: re.Pattern, term_of: dict[str, str]) -> Counter:
    """(breast, descriptor term) of a report, counted."""
    out: Counter = Counter()
    side = "U"
    for sentence in SENTENCE.split(text.lower()):
        sides = {s for m in SIDE_WORDS.finditer(sentence) for s in side_of(m.group("side"))}
        if len(sides) == 1:
            side = sides.pop()
        for m in pattern.finditer(sentence):
            out[(side, term_of[m.group(1)])] += 1
    return out


def clocks(text: str) -> Counter:
    """(breast, finding, clock position) of the parser's locations, counted."""
    return Counter((x["side"], x["finding"], x["clock"]) for x in parse_report(text).locations if x.get("clock"))


def micro_f1(pairs: list[tuple[Counter, Counter]]) -> float:
    tp = fp = fn = 0
    for generated, reference in pairs:
        tp += sum((generated & reference).values())
        fp += sum((generated - reference).values())
        fn += sum((reference - generated).values())
    return 2 * tp / max(1, 2 * tp + fp + fn)


def agreement(read: Callable[[str], Counter], generated: dict[str, str], references: dict[str, str]) -> float:
    """Micro-F1 of what ``read`` finds in the generated reports against the references, per exam."""
    ids = [i for i in references if i in generated]
    return round(micro_f1([(read(generated[i]), read(references[i])) for i in ids]), 3)


def read_texts(path: Path) -> dict[str, str]:
    return {row["id"]: row["text"] for row in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-2])
    pattern, term_of = descriptor_pattern()
    references = read_texts(Path(sys.argv[1]))
    for name in sys.argv[2:]:
        generated = read_texts(Path(name))
        ids = [i for i in references if i in generated]
        hours = Counter(c[2] for i in ids for c in clocks(generated[i]).elements())
        row = {
            "file": name,
            "exams": len(ids),
            "descriptor_f1": agreement(lambda text: descriptors(text, pattern, term_of), generated, references),
            "clock_f1": agreement(clocks, generated, references),
            "clock_positions_written": dict(sorted(hours.items())),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
