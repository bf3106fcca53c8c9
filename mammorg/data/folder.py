"""Plain folders (one per exam, views from DICOM tags, optional report.txt) and DMID."""
from __future__ import annotations

from pathlib import Path

from mammorg.data.common import IngestResult, exam_row, patient_split, read_csv_checked, \
    read_text_report
from mammorg.dicom import read_header, view_of
from mammorg.io import MammorgError
from mammorg.privacy import hash_id

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png")


def labels_from_report(text: str | None, side_for_unlateralised: str | None = None) -> dict:
    """Density, BI-RADS and findings parsed from a report (empty when there is none)."""
    if not text:
        return {"density": None, "birads": {}, "findings": {}}
    from evaluation.parser import parse_report

    parsed = parse_report(text)
    findings = {s: dict(parsed["findings"].get(s) or {}) for s in ("L", "R")}
    if side_for_unlateralised and parsed["findings"].get("U"):
        findings[side_for_unlateralised].update(parsed["findings"]["U"])
    birads = dict(parsed["birads"])
    if side_for_unlateralised and birads.get(side_for_unlateralised) is None:
        birads[side_for_unlateralised] = birads.get("exam")
    return {"density": parsed["density"], "birads": birads, "findings": findings}


def _image_view(path: Path, result: IngestResult, exam_id: str) -> str | None:
    try:
        if path.suffix.lower() == ".png":
            from mammorg.png import read_png

            return read_png(path).view
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


def ingest_folder(root: str | Path) -> IngestResult:
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
        labels = labels_from_report(report)
        result.exams.append(exam_row(
            exam_id, "folder", patient_split(folder.name),
            {v: str(p.relative_to(root)) for v, p in views.items()}, labels["density"],
            labels["birads"], labels["findings"], report))
    return result


DMID_ALIASES = {"image": ["Image", "image_id", "IMAGE", "Image ID", "Image Name"],
                "view": ["View", "VIEW", "view_code", "View Code"],
                "density": ["Density", "Tissue", "tissue", "Tissue Density", "Background Tissue"],
                "class": ["Class", "CLASS", "Abnormality", "abnormality"]}
DMID_VIEWS = {"MLORT": "R_MLO", "MLOLT": "L_MLO", "CCRT": "R_CC", "CCLT": "L_CC"}


def ingest_dmid(root: str | Path) -> IngestResult:
    """DMID: ``DICOM_Images/IMGnnn.dcm``, ``Reports/Imgnnn.txt`` and ``metadata.csv``."""
    root = Path(root)
    result = IngestResult()
    meta_path = next((root / n for n in ("metadata.csv", "Metadata.csv", "Info.csv")
                      if (root / n).is_file()), root / "metadata.csv")
    df = read_csv_checked(meta_path, ["image", "view"], DMID_ALIASES)
    for row in df.to_dict("records"):
        number = "".join(ch for ch in row["image"] if ch.isdigit())
        exam_id = "dmid-" + hash_id(row["image"])
        view = DMID_VIEWS.get(row["view"].upper().replace(" ", ""))
        image = root / "DICOM_Images" / f"IMG{number}.dcm"
        if view is None:
            result.problem(meta_path, f"image {row['image']}: unknown view code {row['view']!r}",
                           exam_id)
            continue
        if not image.is_file():
            result.problem(image, "image file missing", exam_id)
            continue
        report_path = root / "Reports" / f"Img{number}.txt"
        report = read_text_report(report_path, result, exam_id) if report_path.exists() else None
        labels = labels_from_report(report, side_for_unlateralised=view[0])
        result.exams.append(exam_row(
            exam_id, "dmid", patient_split(row["image"]), {view: str(image.relative_to(root))},
            labels["density"], labels["birads"], labels["findings"], report,
            {"class": row.get("class"), "single_image": True}))
    return result
