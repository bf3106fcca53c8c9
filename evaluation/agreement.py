"""Agreement of parsed reports with gold structured reports: how well the parser reads text."""

from __future__ import annotations

from collections.abc import Sequence

from mammorg.labels import SIDES
from mammorg.schema import REPORT_SIDES, StructuredReport


def parser_agreement(parsed: Sequence[StructuredReport], gold: Sequence[StructuredReport]) -> dict[str, float | int]:
    """Density and exam BI-RADS accuracy, per-side BI-RADS accuracy (over sides the gold sets),
    side-aware F1 of positive findings, and the share of gold negations read as negations."""
    n = len(gold)
    density = sum(p.density == g.density for p, g in zip(parsed, gold))
    exam = sum(p.birads.get("exam") == g.birads.get("exam") for p, g in zip(parsed, gold))
    side_pairs = [
        (p.birads.get(s), g.birads.get(s)) for p, g in zip(parsed, gold) for s in SIDES if g.birads.get(s) is not None
    ]
    tp = fp = fn = neg_ok = neg_n = 0
    for p, g in zip(parsed, gold):
        for side in REPORT_SIDES:
            got, want = p.findings.get(side) or {}, g.findings.get(side) or {}
            pos_got = {f for f, v in got.items() if v == "pos"}
            pos_want = {f for f, v in want.items() if v == "pos"}
            tp, fp, fn = (
                tp + len(pos_got & pos_want),
                fp + len(pos_got - pos_want),
                fn + len(pos_want - pos_got),
            )
            for f, v in want.items():
                if v == "neg":
                    neg_n += 1
                    neg_ok += got.get(f) == "neg"
    return {
        "reports": n,
        "density_acc": density / n if n else float("nan"),
        "exam_birads_acc": exam / n if n else float("nan"),
        "side_birads_acc": (sum(a == b for a, b in side_pairs) / len(side_pairs)) if side_pairs else float("nan"),
        "sides_scored": len(side_pairs),
        "positive_finding_f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else float("nan"),
        "negation_acc": neg_ok / neg_n if neg_n else float("nan"),
        "negations_scored": neg_n,
    }
