"""Plain folders: one folder per exam, views from the DICOM tags, an optional ``report.txt``."""

from __future__ import annotations

from pathlib import Path

from mammorg.data.common import (
    IngestResult,
    ReportReader,
    exam_row,
    labels_from_report,
    patient_split,
    read_text_report,
)
from mammorg.dicom import read_header, view_of
from mammorg.io import MammorgError
from mammorg.privacy import hash_id
from mammorg.raster import RASTER_SUFFIXES, read_raster

IMAGE_SUFFIXES = (".dcm", ".dicom", *RASTER_SUFFIXES)


def _image_view(path: Path, result: IngestResult, exam_id: str) -> str | None:
    try:
        if path.suffix.lower() in RASTER_SUFFIXES:
            return read_raster(path, require_view=True).view
        return view_of(read_header(path), path)
    except MammorgError as exc:
        result.problem(path, str(exc).split(": ", 1)[-1], exam_id)
        return None


def exam_views(folder: Path, result: IngestResult, exam_id: str) -> dict[str, Path]:
    """Map view → file for one exam folder; duplicates and unknown views are recorded."""
    views: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        view = _image_view(path, result, exam_id)
        if view is None:
            continue
        if view in views:
            result.problem(path, f"duplicate view {view}; {views[view].name} kept", exam_id)
            continue
        views[view] = path
    return views


def ingest_folder(root: str | Path, read_report: ReportReader) -> IngestResult:
    root = Path(root)
    if not root.is_dir():
        raise MammorgError(f"{root}: not a folder")
    result = IngestResult()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        exam_id = "folder-" + hash_id(folder.name)
        views = exam_views(folder, result, exam_id)
        if not views:
            result.problem(folder, "no usable view", exam_id)
            continue
        report_path = folder / "report.txt"
        report = read_text_report(report_path, result, exam_id) if report_path.exists() else None
        stated = labels_from_report(read_report, report)
        result.exams.append(
            exam_row(
                exam_id,
                "folder",
                patient_split(folder.name),
                {v: str(p.relative_to(root)) for v, p in views.items()},
                stated.density,
                stated.birads,
                stated.findings,
                report,
            )
        )
    return result
