"""DMID (Digital mammography dataset for breast cancer diagnosis research), as published.

- Images: ``DICOM_Images/IMGnnn.dcm`` (or ``TIFF_Images/IMGnnn.tif``), one view per image.
- Reports: ``Reports/Imgnnn.txt``, one per image, CRLF, sections "Breast Composition",
  "BIRADS", "Findings" in varying case and order; no laterality (single-image exams: what the
  report states goes to the side of the image's view).
- Metadata: a spreadsheet (``.xlsx``; a CSV export works too) read without a header row: a
  legend block explains the codes, data rows start with the image name, then the view code
  (``CCLT``, ``MLORT``, also written with a space), the background tissue, the abnormality class
  (``CALC``, ``CIRC``, ``SPIC``, ``MISC``, ``ARCH``, ``ASYM``, ``NORM``, with misspellings) and
  the severity.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mammorg.data.common import (
    IngestResult,
    ReportReader,
    exam_row,
    labels_from_report,
    patient_split,
    read_text_report,
)
from mammorg.io import MammorgError
from mammorg.privacy import hash_id

VIEW_CODES = {
    "MLORT": "R_MLO",
    "MLOLT": "L_MLO",
    "CCRT": "R_CC",
    "CCLT": "L_CC",
    "MLOR": "R_MLO",
    "MLOL": "L_MLO",
    "CCR": "R_CC",
    "CCL": "L_CC",
    "RMLO": "R_MLO",
    "LMLO": "L_MLO",
    "RCC": "R_CC",
    "LCC": "L_CC",
}
CLASS_FINDINGS = {
    "CALC": "calcification",
    "CIRC": "mass",
    "SPIC": "mass",
    "MISC": "mass",
    "ARCH": "architectural_distortion",
    "ASYM": "asymmetry",
    "NORM": None,
}
TISSUE_DENSITY = {"F": "a", "G": "b", "D": "c"}  # fatty, fatty-glandular, dense-glandular
IMAGE_NAME = re.compile(r"^img\s*0*(?P<n>\d+)", re.IGNORECASE)
METADATA_NAMES = (
    "Metadata.xlsx",
    "metadata.xlsx",
    "Info.xlsx",
    "info.xlsx",
    "Metadata.csv",
    "metadata.csv",
    "Info.csv",
    "info.csv",
)


@dataclass(frozen=True)
class DmidRow:
    image: str  # as written (IMG001)
    number: int
    view_code: str
    tissue: str | None
    abnormality: str | None
    severity: str | None


def _cells(values: list) -> list[str]:
    return [str(v).strip() for v in values if not (isinstance(v, float) and pd.isna(v)) and str(v).strip()]


def read_metadata(path: Path) -> list[DmidRow]:
    """Data rows of the metadata sheet (legend and header rows are skipped)."""
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            frame = pd.read_excel(path, header=None, dtype=str)
        else:
            frame = pd.read_csv(
                path,
                header=None,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=True,
                on_bad_lines="skip",
                engine="python",
            )
    except (OSError, ValueError, ImportError, pd.errors.ParserError) as exc:
        raise MammorgError(f"{path}: unreadable DMID metadata ({str(exc).splitlines()[0]})") from None
    rows = []
    for values in frame.itertuples(index=False):
        cells = _cells(list(values))
        m = IMAGE_NAME.match(cells[0]) if cells else None
        if m is None or len(cells) < 2:
            continue  # legend, header or blank row
        rows.append(
            DmidRow(
                cells[0],
                int(m.group("n")),
                cells[1],
                cells[2] if len(cells) > 2 else None,
                cells[3] if len(cells) > 3 else None,
                cells[4] if len(cells) > 4 else None,
            )
        )
    if not rows:
        raise MammorgError(f"{path}: no DMID image rows (rows starting with IMGnnn)")
    return rows


def view_of(code: str) -> str | None:
    return VIEW_CODES.get(re.sub(r"[\s_\-]", "", code.upper()))


def abnormality_finding(code: str | None) -> tuple[str | None, bool]:
    """(finding, known) of an abnormality code; a misspelt code maps to its closest known one."""
    if not code:
        return None, False
    key = re.sub(r"[^A-Z]", "", code.upper())[:4]
    match = (
        key
        if key in CLASS_FINDINGS
        else next(iter(difflib.get_close_matches(key, CLASS_FINDINGS, n=1, cutoff=0.6)), None)
    )
    return (CLASS_FINDINGS[match], True) if match else (None, False)


def _find(folder: Path, stem_number: int, suffixes: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        m = IMAGE_NAME.match(path.stem)
        if m and int(m.group("n")) == stem_number and path.suffix.lower() in suffixes:
            return path
    return None


def ingest_dmid(root: str | Path, read_report: ReportReader) -> IngestResult:
    root = Path(root)
    result = IngestResult()
    meta_path = next((root / n for n in METADATA_NAMES if (root / n).is_file()), None)
    if meta_path is None:
        raise MammorgError(f"{root}: no DMID metadata sheet ({', '.join(METADATA_NAMES[:3])} ...)")
    for row in read_metadata(meta_path):
        exam_id = "dmid-" + hash_id(row.image)
        view = view_of(row.view_code)
        if view is None:
            result.problem(meta_path, f"image {row.image}: unknown view code {row.view_code!r}", exam_id)
            continue
        image = _find(root / "DICOM_Images", row.number, (".dcm", ".dicom")) or _find(
            root / "TIFF_Images", row.number, (".tif", ".tiff")
        )
        if image is None:
            result.problem(root / "DICOM_Images" / f"{row.image}.dcm", "image file missing", exam_id)
            continue
        finding, known = abnormality_finding(row.abnormality)
        if row.abnormality and not known:
            result.problem(meta_path, f"image {row.image}: unknown abnormality code {row.abnormality!r}", exam_id)
        report_path = _find(root / "Reports", row.number, (".txt",))
        report = read_text_report(report_path, result, exam_id) if report_path else None
        stated = labels_from_report(read_report, report, side_for_unlateralised=view[0])
        findings = stated.findings
        if finding and not report:  # no report: the metadata's class is what is known
            findings[view[0]][finding] = "pos"
        density = stated.density or TISSUE_DENSITY.get((row.tissue or "").upper()[:1])
        result.exams.append(
            exam_row(
                exam_id,
                "dmid",
                patient_split(row.image),
                {view: str(image.relative_to(root))},
                density,
                stated.birads,
                findings,
                report,
                {
                    "class": row.abnormality,
                    "severity": row.severity,
                    "tissue": row.tissue,
                    "single_image": True,
                },
            )
        )
    return result
