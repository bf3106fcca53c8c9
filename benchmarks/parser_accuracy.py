"""Report parser on real and hand-written report sets: agreement with gold labels and speed.

Sets (tests/data): DMID development and held-out (real, published reports; see
tests/data/real_reports/README.md), hand-written development (74) and held-out (20) sets with
laterality. Held-out sets were labelled before the parser read them and are never tuned on.
Speed: reports per second on one core, against a bare reference measured in the same run (one
compiled keyword regex over the same texts, no negation, sides or sentences).

Prints one JSON object. Run: python benchmarks/parser_accuracy.py
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from evaluation.agreement import parser_agreement
from evaluation.parser import parse_report
from mammorg.schema import StructuredReport

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SETS = {
    "dmid_dev": DATA / "real_reports" / "dmid_dev.jsonl",
    "dmid_heldout": DATA / "real_reports" / "dmid_heldout.jsonl",
    "handwritten_dev": DATA / "handwritten_reports.jsonl",
    "handwritten_heldout": DATA / "handwritten_heldout.jsonl",
}
KEYWORDS = re.compile(r"mass|opacity|calcification|distortion|asymmetry|lymph|skin|nipple|BI-?RADS\s*\w+", re.I)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _clean(value: float | int) -> float | int | None:
    """Rounded; NaN (a metric with nothing to score, e.g. sides of single-image reports) as null."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _rate(texts: list[str], fn) -> float:
    t0 = time.perf_counter()
    for text in texts:
        fn(text)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    out: dict = {"benchmark": "parser_accuracy"}
    texts: list[str] = []
    for name, path in SETS.items():
        rows = _rows(path)
        texts += [r["text"] for r in rows]
        parsed = [parse_report(r["text"]) for r in rows]
        metrics = parser_agreement(parsed, [StructuredReport.from_json(r["gold"]) for r in rows])
        out[name] = {k: _clean(v) for k, v in metrics.items()}
    parse_report(texts[0])  # warm the spaCy pipeline
    texts = texts * 5
    parser_rate = _rate(texts, parse_report)
    bare_rate = _rate(texts, KEYWORDS.findall)
    out["speed"] = {
        "reports": len(texts),
        "parser_reports_per_s": round(parser_rate, 1),
        "bare_keyword_regex_reports_per_s": round(bare_rate, 1),
        "ratio_parser_vs_bare": round(parser_rate / bare_rate, 4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
