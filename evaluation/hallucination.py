"""Hallucination and consistency checks of generated against reference reports."""

from __future__ import annotations

import re
from collections.abc import Sequence

from evaluation.parser import mentions_prior
from mammorg.labels import BIRADS_NAMES, FINDINGS, birads_agrees_with_findings
from mammorg.schema import StructuredReport

# management phrases and the categories that call for them (BI-RADS 5th edition)
MANAGEMENT_PATTERNS = {
    ("0",): re.compile(r"additional imaging|recall|further imaging|spot compression|additional views", re.I),
    ("1", "2"): re.compile(r"routine (?:screening|annual)|annual screening", re.I),
    ("3",): re.compile(r"short[- ]interval follow[- ]up|six[- ]month|6[- ]month", re.I),
    ("4", "4A", "4B", "4C", "5"): re.compile(r"tissue diagnosis|tissue sampling|biopsy", re.I),
}


def management_inconsistent(stated: StructuredReport, text: str) -> bool:
    """Whether the report's management disagrees with its assessment: a management phrase that no
    stated category calls for, or a final recommendation that the exam category does not call for
    (e.g. BI-RADS 5 with routine screening)."""
    exam = stated.birads.get("exam")
    categories = {c for c in stated.birads.values() if c}
    found = [(m.start(), cats) for cats, pattern in MANAGEMENT_PATTERNS.items() for m in pattern.finditer(text)]
    if not found or exam is None:
        return False
    if any(not categories & set(cats) for _, cats in found):
        return True
    return exam not in max(found)[1]


NAMED_CATEGORY = re.compile(r"BI-?RADS(?:\s+category)?:?\s*(0|1|2|3|4[ABC]?|5|6)\s*(?:-|:|\()\s*", re.I)
NAMES_LONGEST_FIRST = sorted(BIRADS_NAMES.items(), key=lambda item: -len(item[1]))


def category_names_inconsistent(text: str) -> int:
    """How many categories the report names with another category's name ("BI-RADS 4C - Low
    suspicion for malignancy": 4A's name). A category followed by no known name is not counted."""
    wrong = 0
    for m in NAMED_CATEGORY.finditer(text):
        after = " ".join(text[m.end() : m.end() + 60].split()).lower()
        named = next((c for c, name in NAMES_LONGEST_FIRST if after.startswith(name.lower())), None)
        wrong += named is not None and named != m.group(1).upper()
    return wrong


HEADINGS = re.compile(
    r"^\s*(left breast|right breast|breast composition|findings|impression|opinion|overall)\s*:", re.I | re.M
)
SENTENCE_BREAK = re.compile(r"(?<=\.)\s+")  # after joining lines: reports wrap mid-sentence


def repetitive(text: str) -> bool:
    """Whether the report repeats itself: a heading line written twice ("Left Breast:",
    "IMPRESSION:") or the same sentence twice (more than 15 characters). No reference report of
    the data sets here does either; a decoder that loops does both."""
    headings = [m.group(1).lower() for m in HEADINGS.finditer(text)]
    sentences = [s.lower() for s in SENTENCE_BREAK.split(" ".join(text.split())) if len(s) > 15]
    return len(set(headings)) < len(headings) or len(set(sentences)) < len(sentences)


def exam_checks(pred: StructuredReport, ref: StructuredReport, pred_text: str, ref_text: str) -> dict[str, int]:
    """Counts of problems in one generated report."""
    wrong_side = invented = 0
    for side, other in (("L", "R"), ("R", "L")):
        p = pred.findings.get(side) or {}
        r_side, r_other = ref.findings.get(side) or {}, ref.findings.get(other) or {}
        for f in FINDINGS:
            if p.get(f) != "pos" or r_side.get(f) == "pos":
                continue
            if r_other.get(f) == "pos":
                wrong_side += 1
            else:
                invented += 1
    positives = [f for _, f in pred.positives()]
    cat = pred.birads.get("exam")
    inconsistent = cat is not None and not birads_agrees_with_findings(cat, bool(positives))
    return {
        "wrong_side": wrong_side,
        "invented_finding": invented,
        "invented_prior": int(mentions_prior(pred_text) and not mentions_prior(ref_text)),
        "birads_inconsistent": int(inconsistent),
        "management_inconsistent": int(management_inconsistent(pred, pred_text)),
        "category_name_inconsistent": category_names_inconsistent(pred_text),
        "repetitive": int(repetitive(pred_text)),
    }


def hallucination_summary(
    preds: Sequence[StructuredReport],
    refs: Sequence[StructuredReport],
    pred_texts: Sequence[str],
    ref_texts: Sequence[str],
) -> dict:
    """Rates over exams: share of reports with each problem, and totals."""
    rows = [exam_checks(p, r, pt, rt) for p, r, pt, rt in zip(preds, refs, pred_texts, ref_texts)]
    n = max(len(rows), 1)
    keys = (
        "wrong_side",
        "invented_finding",
        "invented_prior",
        "birads_inconsistent",
        "management_inconsistent",
        "category_name_inconsistent",
        "repetitive",
    )
    return {
        **{f"{k}_rate": sum(bool(r[k]) for r in rows) / n for k in keys},
        **{f"{k}_total": sum(r[k] for r in rows) for k in keys},
    }
