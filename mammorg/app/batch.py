"""``mammorg report --batch MANIFEST``: every exam of a manifest; one bad exam does not stop the rest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mammorg.app.reporting import ExamReporter
from mammorg.io import MammorgError, write_jsonl_atomic
from mammorg.schema import read_manifest


def report_manifest(reporter: ExamReporter, manifest: Path, out: Path | None) -> list[dict]:
    """One line per exam (``id`` and the report, or ``id`` and ``error``), in manifest order."""
    rows = []
    for exam in read_manifest(manifest):
        files = [p for v in exam.present_views if (p := exam.view_path(v, manifest.parent)) is not None]
        try:
            rows.append({"id": exam.exam_id, **reporter.report_files(files).to_json()})
        except MammorgError as exc:  # recorded and reported; the batch goes on
            rows.append({"id": exam.exam_id, "error": str(exc)})
            print(f"mammorg: {exam.exam_id}: {exc}", file=sys.stderr)
    if out is not None:
        write_jsonl_atomic(out, rows)
    else:
        for row in rows:
            print(json.dumps(row))
    return rows
