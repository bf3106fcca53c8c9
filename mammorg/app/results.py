"""The result page of a pipeline folder: one self-contained, styled ``index.html``.

No external assets: styles are inline and every image (views with stage-1 heatmaps, plots) is
embedded as a PNG data URI, so the page can be mailed or archived as one file. Sections: the
test-split metrics with 95% intervals beside stage 1's own labels, the consistency checks, the
plots, per-exam cards (the four views with the heatmaps of the findings stage 1 calls and their
boxes; the generated report beside the reference with the clinical facts that agree and disagree
marked; stage-1 probabilities and locations) and the held-out exam reported from the bundle.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.parser import parse_report
from mammorg.geometry import box_to_cache
from mammorg.io import read_jsonl, write_text_atomic
from mammorg.labels import FINDINGS, SIDES, VIEWS
from mammorg.plotting import pyplot
from mammorg.preprocess import load_cached
from mammorg.schema import Exam, GroundedFinding, Stage1Prediction, StructuredReport, read_manifest, read_predictions
from mammorg.training.checkpoint import load_tensors

CARD_EXAMS = 12
PLOTS = (
    ("stage1/learning_curve.png", "Stage-1 learning curve"),
    ("stage1/confusion_birads.png", "Stage-1 BI-RADS (validation)"),
    ("evaluation/confusion_birads.png", "Generated reports: BI-RADS"),
    ("evaluation/confusion_density.png", "Generated reports: density"),
)
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#15324b;color:#fff;padding:22px 32px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;opacity:.85}main{max-width:1180px;margin:0 auto;padding:20px 24px 60px}
h2{font-size:19px;margin:30px 0 12px;border-bottom:2px solid #d5dde5;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;font-size:14px}th,td{border:1px solid #d5dde5;padding:5px 10px;text-align:left}
th{background:#eaf0f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#6b7a88;font-size:12px}.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{background:#fff;border:1px solid #d5dde5;border-radius:6px;margin:0;padding:8px;flex:1 1 260px;max-width:380px}
figure img{width:100%}figcaption{font-size:13px;color:#45535f;margin-top:4px}
.card{background:#fff;border:1px solid #d5dde5;border-radius:8px;margin:16px 0;padding:14px 18px;box-shadow:0 1px 2px #0001}
.card h3{margin:0 0 8px;font-size:16px}.views{width:100%;border-radius:4px;background:#000}
.reports{display:grid;grid-template-columns:1fr 1fr;gap:14px;margin-top:10px}
.reports pre{white-space:pre-wrap;background:#f7f9fb;border:1px solid #e1e7ed;border-radius:4px;padding:8px;margin:4px 0;font:13px/1.4 ui-monospace,Menlo,monospace}
.facts td{font-size:13px}.ok{color:#0b6b2f;font-weight:600}.bad{color:#b3261e;font-weight:600}
.tag{display:inline-block;background:#eaf0f5;border-radius:10px;padding:1px 8px;margin:1px 3px;font-size:12px}
.tag.hot{background:#fde7d9}.muted{color:#6b7a88;font-size:13px}
"""


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def views_png(
    images: dict[str, np.ndarray],
    heat: Any,
    grounded: list[GroundedFinding],
    geometry: dict[str, dict],
) -> str:
    """The four preprocessed views (R_CC, L_CC, R_MLO, L_MLO) with the heatmaps (``[4, F, h, w]``
    probabilities) of the grounded findings and their boxes, as a PNG data URI."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(8, 3.4))
    for ax, view in zip(axes, ("R_CC", "L_CC", "R_MLO", "L_MLO")):
        ax.axis("off")
        ax.set_title(view, fontsize=9)
        image = images.get(view)
        if image is None:
            ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.imshow(image, cmap="gray")
        positive = [g for g in grounded if g.side == view[0]]
        if heat is not None and positive:
            maps = np.asarray(heat[VIEWS.index(view)], dtype=np.float32)
            hot = np.max([maps[FINDINGS.index(g.finding)] for g in positive], axis=0)
            ax.imshow(hot, cmap="inferno", alpha=0.45, extent=(0, image.shape[1], image.shape[0], 0), vmin=0, vmax=1)
        for g in positive:
            if g.view == view and g.box is not None and geometry.get(view):
                b = box_to_cache(g.box, geometry[view])
                ax.add_patch(
                    plt.Rectangle(
                        (b.xmin, b.ymin), b.xmax - b.xmin, b.ymax - b.ymin, fill=False, color="#4fd1ff", lw=1.2
                    )
                )
                ax.text(b.xmin, max(b.ymin - 2, 0), g.finding.replace("_", " "), color="#4fd1ff", fontsize=7)
    fig.tight_layout()
    return _png_uri(fig)


def views_figure(exam: Exam, cache_dir: Path, prediction: Stage1Prediction | None, pred_dir: Path) -> str:
    """``views_png`` of a cached exam and its stage-1 prediction (heatmaps from its feature file)."""
    heat = None
    if prediction is not None and prediction.features:
        path = Path(prediction.features)
        heat = load_tensors(path if path.is_absolute() else pred_dir / path).get("heatmaps")
    images = {
        v: np.asarray(load_cached(cache_dir, entry), dtype=np.float32)
        for v, entry in (exam.cache or {}).items()
        if entry
    }
    return views_png(
        images, None if heat is None else heat.float().numpy(), prediction.grounded if prediction else [], exam.geometry
    )


def facts_table(generated: StructuredReport, reference: StructuredReport) -> str:
    """The clinical facts of both reports, agreeing ones and disagreeing ones marked."""
    rows = [("density", generated.density, reference.density)]
    rows += [(f"BI-RADS {k}", generated.birads.get(k), reference.birads.get(k)) for k in ("exam", *SIDES)]
    for side in SIDES:
        g = {f for f, v in (generated.findings.get(side) or {}).items() if v == "pos"}
        r = {f for f, v in (reference.findings.get(side) or {}).items() if v == "pos"}
        rows.append((f"findings {side}", ", ".join(sorted(g)) or "none", ", ".join(sorted(r)) or "none"))
    body = "".join(
        f"<tr><td>{name}</td><td>{html.escape(str(a))}</td><td>{html.escape(str(b))}</td>"
        f"<td class='{'ok' if a == b else 'bad'}'>{'agrees' if a == b else 'differs'}</td></tr>"
        for name, a, b in rows
    )
    return f"<table class='facts'><tr><th>fact</th><th>generated</th><th>reference</th><th></th></tr>{body}</table>"


def stage1_summary(prediction: Stage1Prediction | None) -> str:
    if prediction is None:
        return ""
    parts = []
    for side in SIDES:
        birads = (prediction.probs.birads or {}).get(side)
        findings = (prediction.probs.findings or {}).get(side)
        if not birads or not findings:
            continue
        top = sorted(birads.items(), key=lambda kv: -kv[1])[:3]
        tags = " ".join(f"<span class='tag'>BI-RADS {c}: {p:.2f}</span>" for c, p in top)
        tags += " ".join(
            f"<span class='tag{' hot' if p >= 0.5 else ''}'>{f.replace('_', ' ')}: {p:.2f}</span>"
            for f, p in sorted(findings.items(), key=lambda kv: -kv[1])
            if p >= 0.1
        )
        located = [g for g in prediction.grounded if g.side == side and g.location.get("quadrant")]
        where = "; ".join(
            f"{g.finding.replace('_', ' ')} {g.location['quadrant']}"
            + (f" {g.location['clock']} o'clock" if g.location.get("clock") else "")
            for g in located
        )
        parts.append(
            f"<p><b>{side}</b> {tags}" + (f"<br><span class='muted'>located: {where}</span>" if where else "") + "</p>"
        )
    return "<div><b>Stage 1</b> (probabilities; decisions at the run's operating points)" + "".join(parts) + "</div>"


def exam_cards(out: Path, ids: list[str], generated: dict[str, str], references: dict[str, str]) -> str:
    cache_dir = out / "cache"
    exams = {e.exam_id: e for e in read_manifest(cache_dir / "manifest.jsonl")}
    pred_path = out / "stage1" / "predictions.jsonl"
    predictions = {p.exam_id: p for p in read_predictions(pred_path)} if pred_path.exists() else {}
    cards = []
    for exam_id in ids:
        exam = exams.get(exam_id)
        if exam is None:
            continue
        prediction = predictions.get(exam_id)
        gen, ref = generated[exam_id], references[exam_id]
        cards.append(
            f"<section class='card'><h3>Exam {html.escape(exam_id)}</h3>"
            f"<img class='views' alt='four views' src='{views_figure(exam, cache_dir, prediction, pred_path.parent)}'>"
            f"<div class='reports'><div><b>Generated</b><pre>{html.escape(gen)}</pre></div>"
            f"<div><b>Reference</b><pre>{html.escape(ref)}</pre></div></div>"
            f"{facts_table(parse_report(gen), parse_report(ref))}{stage1_summary(prediction)}</section>"
        )
    return "".join(cards)


def metrics_table(summary: dict, metrics: dict) -> str:
    stage1 = summary.get("stage1_test_as_report") or {}
    ci = metrics.get("ci95") or {}
    rows = []
    for key, value in summary["metrics"].items():
        interval = ci.get(key)
        band = f" <span class='ci'>[{_fmt(interval[0])}, {_fmt(interval[1])}]</span>" if interval else ""
        rows.append(
            f"<tr><td>{key}</td><td class='num'>{_fmt(value)}{band}</td><td class='num'>{_fmt(stage1.get(key))}</td></tr>"
        )
    checks = metrics.get("hallucination") or {}
    checks_rows = "".join(
        f"<tr><td>{k.removesuffix('_rate').replace('_', ' ')}</td><td class='num'>{v:.3f}</td></tr>"
        for k, v in checks.items()
        if k.endswith("_rate")
    )
    agree = summary.get("stage1_agreement") or {}
    agree_rows = "".join(
        f"<tr><td>{k.replace('_', ' ')}</td><td class='num'>{_fmt(v)}</td></tr>" for k, v in agree.items() if k != "n"
    )
    agreement = (
        "<h2>Agreement with stage 1</h2><p class='muted'>Generated reports scored against stage 1's own labels "
        "of the same exams (the knowledge the decoder was given): how faithfully the reports state it.</p>"
        f"<table><tr><th>fact</th><th>agreement</th></tr>{agree_rows}</table>"
        if agree_rows
        else ""
    )
    return (
        "<table><tr><th>metric (test split, against the reference reports)</th><th>generated reports [95% CI]</th>"
        f"<th>stage-1 labels</th></tr>{''.join(rows)}</table>"
        "<h2>Consistency and hallucination checks</h2><p class='muted'>Share of generated reports with each problem.</p>"
        f"<table><tr><th>check</th><th>rate</th></tr>{checks_rows}</table>" + agreement
    )


def held_out_section(out: Path) -> str:
    path = out / "report_example.json"
    if not path.exists():
        return ""
    report = json.loads(path.read_text())
    structured = report.get("structured") or {}
    grounded = ((report.get("stage1") or {}).get("grounded")) or []
    where = "".join(
        f"<li>{html.escape(g['side'])} {html.escape(g['finding'].replace('_', ' '))}: view {g.get('view')}, box "
        f"{g.get('box')}, {html.escape(json.dumps(g.get('location') or {}))}, score {g['score']:.2f}</li>"
        for g in grounded
    )
    return (
        "<h2>A held-out exam reported from the exported bundle</h2><section class='card'>"
        f"<p class='muted'>mammorg report, {report.get('seconds', 0):.2f} s; views {', '.join(report.get('views', []))}"
        + (f"; flags: {html.escape('; '.join(report.get('flags') or []))}" if report.get("flags") else "")
        + f"</p><pre>{html.escape(report.get('text', ''))}</pre>"
        f"<p><b>density</b> {structured.get('density')} · <b>BI-RADS</b> {html.escape(json.dumps(structured.get('birads')))}</p>"
        + (f"<p><b>Grounded findings</b></p><ul>{where}</ul>" if where else "")
        + "</section>"
    )


def write_index(out: Path, summary: dict) -> None:
    """``OUT/index.html`` of a finished pipeline folder."""
    generated = {r["id"]: r["text"] for r in read_jsonl(out / "generated.jsonl")}
    references = {r["id"]: r["text"] for r in read_jsonl(out / "references.jsonl")}
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    ids = [i for i in generated if i in references][:CARD_EXAMS]
    plots = "".join(
        f"<figure><img alt='{html.escape(title)}' src='{_file_uri(out / rel)}'><figcaption>{html.escape(title)}</figcaption></figure>"
        for rel, title in PLOTS
        if (out / rel).exists()
    )
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("timings_s", {}).items())
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>mammorg results</title>"
        f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>"
        "<header><h1>mammorg: generated mammography reports</h1>"
        f"<p>{summary.get('generated_test_reports')} test exams · {summary.get('seconds', 0):.0f} s in all ({html.escape(timings)})</p></header><main>"
        "<h2>Clinical efficacy and language metrics</h2>"
        + metrics_table(summary, metrics)
        + (f"<h2>Plots</h2><div class='grid'>{plots}</div>" if plots else "")
        + f"<h2>Test exams</h2><p class='muted'>The first {len(ids)} test exams. Heatmaps: the findings stage 1 calls "
        "positive (brighter = more likely); blue boxes: where stage 1 grounds them.</p>"
        + exam_cards(out, ids, generated, references)
        + held_out_section(out)
        + "</main></body></html>"
    )
    write_text_atomic(out / "index.html", page)
