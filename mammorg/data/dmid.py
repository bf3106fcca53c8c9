"""DMID (Digital Mammography Dataset for breast cancer diagnosis research, India)."""

from __future__ import annotations

from pathlib import Path

from mammorg.data.common import (
    IngestResult,
    ReportReader,
    exam_row,
    labels_from_report,
    patient_split,
    read_csv_checked,
    read_text_report,
)
from mammorg.privacy import hash_id

DMID_ALIASES = {
    "image": ["Image", "image_id", "IMAGE", "Image ID", "Image Name"],
    "view": ["View", "VIEW", "view_code", "View Code"],
    "density": ["Density", "Tissue", "tissue", "Tissue Density", "Background Tissue"],
    "class": ["Class", "CLASS", "Abnormality", "abnormality"],
}
DMID_VIEWS = {"MLORT": "R_MLO", "MLOLT": "L_MLO", "CCRT": "R_CC", "CCLT": "L_CC"}


def ingest_dmid(root: str | Path, read_report: ReportReader) -> IngestResult:
    """DMID: ``DICOM_Images/IMGnnn.dcm``, ``Reports/Imgnnn.txt`` and ``metadata.csv``."""
    root = Path(root)
    result = IngestResult()
    meta_path = next(
        (root / n for n in ("metadata.csv", "Metadata.csv", "Info.csv") if (root / n).is_file()),
        root / "metadata.csv",
    )
    df = read_csv_checked(meta_path, ["image", "view"], DMID_ALIASES)
    for row in df.to_dict("records"):
        number = "".join(ch for ch in row["image"] if ch.isdigit())
        exam_id = "dmid-" + hash_id(row["image"])
        view = DMID_VIEWS.get(row["view"].upper().replace(" ", ""))
        image = root / "DICOM_Images" / f"IMG{number}.dcm"
        if view is None:
            result.problem(meta_path, f"image {row['image']}: unknown view code {row['view']!r}", exam_id)
            continue
        if not image.is_file():
            result.problem(image, "image file missing", exam_id)
            continue
        report_path = root / "Reports" / f"Img{number}.txt"
        report = read_text_report(report_path, result, exam_id) if report_path.exists() else None
        stated = labels_from_report(read_report, report, side_for_unlateralised=view[0])
        result.exams.append(
            exam_row(
                exam_id,
                "dmid",
                patient_split(row["image"]),
                {view: str(image.relative_to(root))},
                stated.density,
                stated.birads,
                stated.findings,
                report,
                {"class": row.get("class"), "single_image": True},
            )
        )
    return result
