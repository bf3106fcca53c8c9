"""The result page of a pipeline folder (``index.html``) and its figure of sample exams."""

from __future__ import annotations

import html
import json
from pathlib import Path

from mammorg.io import read_jsonl, write_text_atomic
from mammorg.plotting import pyplot, save_figure
from mammorg.preprocess import load_cached
from mammorg.schema import read_manifest


def sample_figure(out: Path, exam_ids: list[str]) -> str:
    """The four cached views of a few exams, as one PNG."""
    cache_dir = out / "cache"
    rows = [r for r in read_manifest(cache_dir / "manifest.jsonl") if r.exam_id in exam_ids]
    fig, axes = pyplot().subplots(len(rows), 4, figsize=(6, 3.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, view in enumerate(("R_CC", "L_CC", "R_MLO", "L_MLO")):
            ax = axes[r][c]
            entry = (row.cache or {}).get(view)
            if entry:
                ax.imshow(load_cached(cache_dir, entry), cmap="gray")
            ax.set_title(f"{row.exam_id[-6:]} {view}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out / "samples.png", dpi=80)
    return "samples.png"


def write_index(out: Path, summary: dict) -> None:
    gen = {r["id"]: r["text"] for r in read_jsonl(out / "generated.jsonl")}
    ref = {r["id"]: r["text"] for r in read_jsonl(out / "references.jsonl")}
    report = json.loads((out / "report_example.json").read_text()) if (out / "report_example.json").exists() else {}
    ids = [i for i in gen if i in ref][:3]
    sample_figure(out, ids)
    table = "".join(
        f"<tr><td>{k}</td><td>{'n/a' if v is None else f'{v:.3f}'}</td></tr>" for k, v in summary["metrics"].items()
    )
    samples = "".join(
        f"<h3>{html.escape(i)}</h3><p><b>generated</b>: {html.escape(gen[i])}</p>"
        f"<p><b>reference</b>: {html.escape(ref[i])}</p>"
        for i in ids
    )
    plots = "".join(
        f"<img src='{p}' style='max-width:45%'>"
        for p in (
            "stage1/learning_curve.png",
            "stage1/confusion_birads.png",
            "evaluation/confusion_birads.png",
            "evaluation/confusion_density.png",
        )
        if (out / p).exists()
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>mammorg pipeline</title>"
        "<h1>mammorg pipeline</h1><h2>Test-split metrics (generated vs. reference reports)</h2>"
        f"<table border=1 cellpadding=4>{table}</table><p>Full tables: "
        "<a href='evaluation/index.html'>evaluation</a>, <a href='bundle/README.md'>model card</a></p>"
        f"<h2>Plots</h2>{plots}<h2>Sample exams</h2><img src='samples.png'>{samples}"
        "<h2>mammorg report on a held-out exam (from the bundle)</h2><pre>"
        + html.escape(
            json.dumps(
                {k: report[k] for k in ("text", "structured", "missing_views", "seconds") if k in report},
                indent=2,
            )
        )
        + "</pre><h2>Summary</h2><pre>"
        + html.escape(json.dumps(summary, indent=2))
        + "</pre>"
    )
    write_text_atomic(out / "index.html", page)
