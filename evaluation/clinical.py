"""Clinical-efficacy metrics on parsed reports: BI-RADS, density, side-aware findings."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import f1_score

from mammorg.labels import BIRADS_VALUES, DENSITIES, FINDINGS
from mammorg.schema import REPORT_SIDES, StructuredReport

MISSING = "none"


def _labels(structs: Sequence[StructuredReport], get: Callable[[StructuredReport], str | None]) -> list[str]:
    return [get(s) or MISSING for s in structs]


def macro_f1(ref: list[str], pred: list[str], classes: Sequence[str]) -> float:
    """Macro-F1 over the reference classes present (a missing prediction counts as wrong)."""
    present = [c for c in classes if c in ref]
    if not present:
        return float("nan")
    return float(f1_score(ref, pred, labels=present, average="macro", zero_division=0))


def _accuracy(ref: list[str], pred: list[str]) -> float:
    pairs = [(r, p) for r, p in zip(ref, pred) if r != MISSING]
    return float(np.mean([r == p for r, p in pairs])) if pairs else float("nan")


def finding_counts(pred: StructuredReport, ref: StructuredReport) -> np.ndarray:
    """Per category (tp, fp, fn) of positive findings, matched by side (L, R, U)."""
    out = np.zeros((len(FINDINGS), 3), dtype=np.int64)
    for side in REPORT_SIDES:
        p = pred.findings.get(side) or {}
        r = ref.findings.get(side) or {}
        for i, f in enumerate(FINDINGS):
            pp, rp = p.get(f) == "pos", r.get(f) == "pos"
            out[i] += (pp and rp, pp and not rp, rp and not pp)
    return out


def location_counts(pred: StructuredReport, ref: StructuredReport) -> np.ndarray:
    """(tp, fp, fn) of located findings: (side, finding, quadrant) triples of positive findings
    the reference locates; a prediction of such a finding counts with the quadrant it states (a
    finding stated without a location, or not at all, is a miss; a location the reference does
    not give cannot be judged and is left out)."""

    def triples(report: StructuredReport) -> set[tuple[str, str, str]]:
        return {
            (str(x["side"]), str(x["finding"]), str(x["quadrant"]))
            for x in report.locations
            if x.get("quadrant") and (report.findings.get(str(x["side"])) or {}).get(str(x["finding"])) == "pos"
        }

    want = triples(ref)
    judged = {(side, f) for side, f, _ in want}
    got = {t for t in triples(pred) if (t[0], t[1]) in judged}
    return np.array([len(got & want), len(got - want), len(want - got)], dtype=np.int64)


def _f1(counts: np.ndarray) -> float:
    tp, fp, fn = counts
    return float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else float("nan")


def _birads_of(key: str) -> Callable[[StructuredReport], str | None]:
    return lambda s: s.birads.get(key)


def point_metrics(preds: Sequence[StructuredReport], refs: Sequence[StructuredReport]) -> dict:
    """All clinical-efficacy point estimates for aligned parsed predictions and references."""
    out: dict = {}
    for key, get in (
        ("birads", _birads_of("exam")),
        ("birads_L", _birads_of("L")),
        ("birads_R", _birads_of("R")),
    ):
        r, p = _labels(refs, get), _labels(preds, get)
        out[f"{key}_acc"] = _accuracy(r, p)
        out[f"{key}_f1"] = macro_f1(r, p, BIRADS_VALUES)
    r, p = _labels(refs, lambda s: s.density), _labels(preds, lambda s: s.density)
    out["density_acc"] = _accuracy(r, p)
    out["density_f1"] = macro_f1(r, p, DENSITIES)
    counts = sum((finding_counts(a, b) for a, b in zip(preds, refs)), np.zeros((len(FINDINGS), 3), dtype=np.int64))
    out["finding_f1"] = _f1(counts.sum(axis=0))
    out["finding_f1_macro"] = float(np.nanmean([_f1(c) for c in counts]) if counts.sum() else np.nan)
    located = sum((location_counts(a, b) for a, b in zip(preds, refs)), np.zeros(3, dtype=np.int64))
    out["location_finding_f1"] = _f1(located)
    out["located_findings"] = int(located[0] + located[2])
    out["per_finding"] = {
        f: {"tp": int(c[0]), "fp": int(c[1]), "fn": int(c[2]), "f1": _f1(c)} for f, c in zip(FINDINGS, counts)
    }
    return out


def bootstrap_ci(
    preds: Sequence[StructuredReport],
    refs: Sequence[StructuredReport],
    keys: Sequence[str],
    n: int = 1000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile 95% intervals of the given metric keys over exams resampled with replacement."""
    if n <= 0 or not preds:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    idx_all = np.arange(len(preds))
    for _ in range(n):
        idx = rng.choice(idx_all, size=len(idx_all), replace=True)
        m = point_metrics([preds[i] for i in idx], [refs[i] for i in idx])
        for k in keys:
            samples[k].append(m[k])
    return {
        k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        for k, v in samples.items()
        if not np.all(np.isnan(v))
    }


def per_exam_scores(preds: Sequence[StructuredReport], refs: Sequence[StructuredReport]) -> dict[str, np.ndarray]:
    """Per-exam scores for paired tests: BI-RADS/density correctness, finding counts, and the
    exam BI-RADS categories as class codes (``birads_ref``/``birads_pred``, -1: none stated)."""
    birads = np.array([p.birads.get("exam") == r.birads.get("exam") for p, r in zip(preds, refs)], dtype=float)
    density = np.array([p.density == r.density for p, r in zip(preds, refs)], dtype=float)
    counts = np.stack([finding_counts(p, r).sum(axis=0) for p, r in zip(preds, refs)]) if preds else np.zeros((0, 3))
    return {
        "birads_acc": birads,
        "density_acc": density,
        "finding_counts": counts,
        "birads_ref": _birads_codes(refs),
        "birads_pred": _birads_codes(preds),
    }


def _birads_codes(structs: Sequence[StructuredReport]) -> np.ndarray:
    codes = {c: i for i, c in enumerate(BIRADS_VALUES)}
    return np.array([codes.get(s.birads.get("exam") or "", -1) for s in structs], dtype=np.int64)


def birads_macro_f1_codes(ref: np.ndarray, pred: np.ndarray) -> float:
    """``macro_f1`` on class codes (vectorised for resampling): the mean F1 over the reference
    classes present; a prediction of -1 (none) counts as wrong, a reference of -1 is left out."""
    k = len(BIRADS_VALUES) + 1  # the last row/column: none
    conf = np.bincount(np.where(ref < 0, k - 1, ref) * k + np.where(pred < 0, k - 1, pred), minlength=k * k).reshape(
        k, k
    )
    tp, support, predicted = np.diag(conf)[:-1], conf[:-1].sum(axis=1), conf[:, :-1].sum(axis=0)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(2 * tp[present] / (support[present] + predicted[present])))


def _mean_of(key: str, scores: dict[str, np.ndarray], index: np.ndarray) -> float:
    return float(scores[key][index].mean())


def paired_bootstrap(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], n: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """Paired bootstrap of system A − system B on the same references (two-sided p-values): the
    clinical scores of ``per_exam_scores``, and ROUGE-L and CIDEr where both hold per-report
    scores (``evaluation.nlg.nlg_per_exam``)."""
    with_codes = "birads_ref" in a and "birads_ref" in b
    if with_codes and not np.array_equal(a["birads_ref"], b["birads_ref"]):
        raise ValueError("paired bootstrap: the two systems are scored against different references")
    rng = np.random.default_rng(seed)
    m = len(a["birads_acc"])
    stats = {
        "birads_acc": lambda s, i: s["birads_acc"][i].mean(),
        "density_acc": lambda s, i: s["density_acc"][i].mean(),
        "finding_f1": lambda s, i: _f1(s["finding_counts"][i].sum(axis=0)),
    }
    if with_codes:
        stats["birads_f1"] = lambda s, i: birads_macro_f1_codes(s["birads_ref"][i], s["birads_pred"][i])
    for key in ("rouge_l", "cider"):  # per-report scores (``nlg_per_exam``), where both systems have them
        if key in a and key in b:
            stats[key] = functools.partial(_mean_of, key)
    out = {}
    for key, stat in stats.items():
        full = np.arange(m)
        delta = stat(a, full) - stat(b, full)
        diffs = np.array([stat(a, i) - stat(b, i) for i in (rng.integers(0, m, m) for _ in range(n))])
        if not m or np.isnan(diffs).all():  # e.g. no finding in either system or reference
            out[key] = {"delta": float(delta), "p_value": float("nan"), "ci95": [float("nan")] * 2}
            continue
        centred = diffs - np.nanmean(diffs)
        out[key] = {
            "delta": float(delta),
            "p_value": float(np.nanmean(np.abs(centred) >= abs(delta))),
            "ci95": [float(np.nanpercentile(diffs, 2.5)), float(np.nanpercentile(diffs, 97.5))],
        }
    return out
