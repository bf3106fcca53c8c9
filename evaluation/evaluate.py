"""End-to-end evaluation of generated reports: input checks, metrics, plots, HTML."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from evaluation.clinical import bootstrap_ci, paired_bootstrap, per_exam_scores, point_metrics
from evaluation.hallucination import hallucination_summary
from evaluation.nlg import nlg_metrics, nlg_per_exam
from evaluation.parser import parse_report
from evaluation.plots import confusion_png
from mammorg.io import MammorgError, read_jsonl, write_json_atomic, write_text_atomic
from mammorg.labels import BIRADS_VALUES, DENSITIES
from mammorg.schema import StructuredReport

MAX_CHARS = 20_000
CI_KEYS = ("birads_acc", "birads_f1", "density_f1", "finding_f1")


def load_texts(path: str | Path, allow_empty: bool = False) -> dict[str, str]:
    """``{"id", "text"}`` lines → {id: text}; duplicates, overlong and (unless ``allow_empty``:
    a model may generate nothing) empty texts are errors."""
    out: dict[str, str] = {}
    for lineno, row in enumerate(read_jsonl(path), 1):
        if "id" not in row or "text" not in row:
            raise MammorgError(f"{path}:{lineno}: each line needs 'id' and 'text'")
        rid, text = str(row["id"]), row["text"]
        if rid in out:
            raise MammorgError(f"{path}:{lineno}: duplicate id {rid!r}")
        if not isinstance(text, str) or (not text.strip() and not allow_empty):
            raise MammorgError(f"{path}:{lineno}: empty text for id {rid!r}")
        if len(text) > MAX_CHARS:
            raise MammorgError(f"{path}:{lineno}: text of id {rid!r} is longer than {MAX_CHARS} chars")
        out[rid] = text
    return out


def aligned(pred: dict[str, str], ref: dict[str, str], pred_path, ref_path) -> list[str]:
    missing = sorted(set(ref) - set(pred))
    extra = sorted(set(pred) - set(ref))
    if missing or extra:
        raise MammorgError(
            f"{pred_path} and {ref_path}: ids differ ({len(missing)} missing from "
            f"predictions, e.g. {missing[:3]}; {len(extra)} not in references, "
            f"e.g. {extra[:3]})"
        )
    return sorted(ref)


def compute_metrics(
    pred_texts: list[str], ref_texts: list[str], bootstrap: int = 1000, meteor: bool = True
) -> tuple[dict, list[StructuredReport], list[StructuredReport]]:
    preds = [parse_report(t) for t in pred_texts]
    refs = [parse_report(t) for t in ref_texts]
    metrics = point_metrics(preds, refs)
    metrics.update(nlg_metrics(pred_texts, ref_texts, meteor=meteor))
    metrics["hallucination"] = hallucination_summary(preds, refs, pred_texts, ref_texts)
    metrics["ci95"] = bootstrap_ci(preds, refs, CI_KEYS, n=bootstrap)
    metrics["n"] = len(preds)
    metrics["empty_predictions"] = sum(1 for t in pred_texts if not t.strip())
    return metrics, preds, refs


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def metrics_markdown(m: dict) -> str:
    keys = [
        "birads_acc",
        "birads_f1",
        "density_f1",
        "finding_f1",
        "bleu_1",
        "bleu_4",
        "meteor",
        "rouge_l",
        "cider",
    ]
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k in keys:
        ci = m.get("ci95", {}).get(k)
        lines.append(f"| {k} | {_fmt(m.get(k))} | {'' if not ci else _fmt(ci[0]) + '–' + _fmt(ci[1])} |")
    lines += ["", "| finding | tp | fp | fn | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {f} | {c['tp']} | {c['fp']} | {c['fn']} | {_fmt(c['f1'])} |" for f, c in m["per_finding"].items()]
    return "\n".join(lines) + "\n"


def index_html(ids: list[str], pred_texts, ref_texts, preds, refs, metrics: dict) -> str:
    rows = []
    for i, rid in enumerate(ids[:500]):
        rows.append(
            f"<tr><td>{html.escape(rid)}</td><td><pre>{html.escape(pred_texts[i])}</pre>"
            f"<code>{html.escape(json.dumps(preds[i].to_json()))}</code></td><td><pre>"
            f"{html.escape(ref_texts[i])}</pre><code>{html.escape(json.dumps(refs[i].to_json()))}</code></td></tr>"
        )
    return (
        "<!doctype html><meta charset='utf-8'><title>mammorg evaluation</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;border-top:1px solid #ccc}"
        "pre{white-space:pre-wrap;max-width:45em}code{font-size:70%}</style>"
        "<h1>Evaluation</h1>"
        + _md_table_html(metrics)
        + "<p><img src='confusion_birads.png'> <img src='confusion_density.png'></p>"
        "<table><tr><th>id</th><th>generated</th><th>reference</th></tr>" + "".join(rows) + "</table>"
    )


def _md_table_html(m: dict) -> str:
    keys = ["birads_acc", "birads_f1", "density_f1", "finding_f1", "bleu_4", "rouge_l", "cider"]
    return "<table>" + "".join(f"<tr><td>{k}</td><td>{_fmt(m.get(k))}</td></tr>" for k in keys) + "</table>"


def paired_scores(
    texts: list[str], structured: list[StructuredReport], ref_texts: list[str], refs: list[StructuredReport]
) -> dict[str, np.ndarray]:
    """Per-exam scores for ``paired_bootstrap``: the clinical ones and ROUGE-L and CIDEr."""
    return {**per_exam_scores(structured, refs), **nlg_per_exam(texts, ref_texts)}


def evaluate_files(pred_path, ref_path, out_dir, pred_b_path=None, bootstrap: int = 1000, meteor: bool = True) -> dict:
    """Evaluate aligned JSONL files and write metrics.json, metrics.md, PNGs and index.html."""
    pred, ref = load_texts(pred_path, allow_empty=True), load_texts(ref_path)
    ids = aligned(pred, ref, pred_path, ref_path)
    pred_texts, ref_texts = [pred[i] for i in ids], [ref[i] for i in ids]
    metrics, preds, refs = compute_metrics(pred_texts, ref_texts, bootstrap, meteor)
    if pred_b_path:
        pred_b = load_texts(pred_b_path, allow_empty=True)
        aligned(pred_b, ref, pred_b_path, ref_path)
        texts_b = [pred_b[i] for i in ids]
        a = paired_scores(pred_texts, preds, ref_texts, refs)
        b = paired_scores(texts_b, [parse_report(t) for t in texts_b], ref_texts, refs)
        metrics["paired_vs_b"] = paired_bootstrap(a, b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    confusion_png(
        [r.birads["exam"] for r in refs],
        [p.birads["exam"] for p in preds],
        list(BIRADS_VALUES),
        "BI-RADS (exam)",
        out / "confusion_birads.png",
    )
    confusion_png(
        [r.density for r in refs],
        [p.density for p in preds],
        list(DENSITIES),
        "density",
        out / "confusion_density.png",
    )
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "metrics.md", metrics_markdown(metrics))
    write_text_atomic(out / "index.html", index_html(ids, pred_texts, ref_texts, preds, refs, metrics))
    return metrics
