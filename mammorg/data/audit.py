"""``mammorg data audit``: counts, missing views, label distributions and problems."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mammorg.data.ingest import problems_path
from mammorg.io import read_jsonl
from mammorg.labels import FINDINGS, SIDES, VIEWS
from mammorg.schema import read_manifest


def audit_manifest(manifest: str | Path) -> dict:
    """Summarise a manifest; also checks that every referenced image exists."""
    manifest = Path(manifest)
    exams = read_manifest(manifest)
    missing_views: Counter[str] = Counter()
    density: Counter[str] = Counter()
    birads: Counter[str] = Counter()
    findings: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    absent_files = []
    for ex in exams:
        splits[f"{ex.dataset}/{ex.split}"] += 1
        for v in VIEWS:
            path = ex.view_path(v, manifest.parent)
            if path is None:
                missing_views[v] += 1
            elif not path.exists():
                absent_files.append({"exam_id": ex.exam_id, "view": v, "problem": "file missing"})
        density[str(ex.labels.density)] += 1
        for side in SIDES:
            birads[str(ex.labels.birads.get(side))] += 1
            for f, state in ex.labels.findings[side].items():
                findings[f"{f}:{state}"] += 1
    problems = read_jsonl(problems_path(manifest)) if problems_path(manifest).exists() else []
    return {
        "manifest": str(manifest),
        "exams": len(exams),
        "splits": dict(sorted(splits.items())),
        "missing_views": {v: missing_views[v] for v in VIEWS},
        "complete_exams": sum(len(ex.present_views) == len(VIEWS) for ex in exams),
        "density": dict(sorted(density.items())),
        "birads_per_breast": dict(sorted(birads.items())),
        "findings": {f: {s: findings[f"{f}:{s}"] for s in ("pos", "neg", "unc")} for f in FINDINGS},
        "with_report": sum(bool(ex.report) for ex in exams),
        "templated_reports": sum(ex.report_origin == "templated" for ex in exams),
        "lesion_boxes": sum(1 for ex in exams for x in ex.lesions if x.box is not None),
        "problems": problems + absent_files,
    }


def format_audit(summary: dict) -> str:
    lines = [
        f"manifest: {summary['manifest']}",
        f"exams: {summary['exams']} "
        f"(complete four-view: {summary['complete_exams']}, with report: {summary['with_report']})",
        "splits: " + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()),
        "missing views: " + ", ".join(f"{k}={v}" for k, v in summary["missing_views"].items()),
        "density: " + ", ".join(f"{k}={v}" for k, v in summary["density"].items()),
        "BI-RADS per breast: " + ", ".join(f"{k}={v}" for k, v in summary["birads_per_breast"].items()),
        "findings (pos/neg/unc):",
    ]
    lines += [f"  {f}: {c['pos']}/{c['neg']}/{c['unc']}" for f, c in summary["findings"].items()]
    lines.append(f"problems: {len(summary['problems'])}")
    lines += [f"  {p.get('source') or p.get('exam_id')}: {p['problem']}" for p in summary["problems"][:50]]
    return "\n".join(lines)
