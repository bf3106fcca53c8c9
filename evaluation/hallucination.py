"""Hallucination and consistency checks of generated against reference reports."""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.parser import mentions_prior
from mammorg.labels import FINDINGS, birads_severity
from mammorg.schema import StructuredReport


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
    inconsistent = cat is not None and (
        (cat == "1" and bool(positives)) or (birads_severity(cat) >= birads_severity("4") and not positives)
    )
    return {
        "wrong_side": wrong_side,
        "invented_finding": invented,
        "invented_prior": int(mentions_prior(pred_text) and not mentions_prior(ref_text)),
        "birads_inconsistent": int(inconsistent),
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
    keys = ("wrong_side", "invented_finding", "invented_prior", "birads_inconsistent")
    return {
        **{f"{k}_rate": sum(bool(r[k]) for r in rows) / n for k in keys},
        **{f"{k}_total": sum(r[k] for r in rows) for k in keys},
    }
