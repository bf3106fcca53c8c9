"""VinDr-Mammo adapter (also reads what ``mammorg synth`` writes)."""

from __future__ import annotations

import ast
from pathlib import Path

from mammorg.data.common import IngestResult, exam_row, patient_split, read_csv_checked
from mammorg.io import read_jsonl
from mammorg.labels import BIRADS_VALUES, FINDINGS, SIDES
from mammorg.privacy import hash_id
from mammorg.schema import Box, Lesion

BREAST_COLUMNS = [
    "study_id",
    "image_id",
    "laterality",
    "view_position",
    "breast_birads",
    "breast_density",
    "split",
]
CATEGORY_MAP = {
    "Mass": "mass",
    "Suspicious Calcification": "calcification",
    "Calcification": "calcification",
    "Asymmetry": "asymmetry",
    "Focal Asymmetry": "asymmetry",
    "Global Asymmetry": "asymmetry",
    "Architectural Distortion": "architectural_distortion",
    "Skin Thickening": "skin_thickening",
    "Nipple Retraction": "nipple_retraction",
    "Suspicious Lymph Node": "lymph_node",
    "Lymph Node": "lymph_node",
    "Skin Retraction": None,  # an associated feature outside the label space
    "No Finding": None,
}


def parse_birads(value: str) -> str | None:
    """``"BI-RADS 4"`` → ``"4"``; ``"BI-RADS 4B"`` → ``"4B"``."""
    token = value.upper().replace("BI-RADS", "").strip()
    return token if token in BIRADS_VALUES else None


def parse_density(value: str) -> str | None:
    token = value.upper().replace("DENSITY", "").strip().lower()
    return token if token in ("a", "b", "c", "d") else None


def _categories(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return [text]
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _box(row: dict, width: float, height: float) -> Box | None:
    """A finding row's box in original pixels, clipped to the image (VinDr boxes can stick out,
    some start at negative coordinates); None for rows without one."""
    try:
        box = Box(*(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    except (KeyError, TypeError, ValueError):
        return None
    box = box.clipped(width, height) if width > 0 and height > 0 else box
    return None if box.empty else box


def _size(row: dict) -> tuple[float, float]:
    try:
        return float(row.get("width") or 0), float(row.get("height") or 0)
    except ValueError:
        return 0.0, 0.0


def _findings(
    rows: list[dict], kept_images: set[str], result: IngestResult, source: Path, exam_id: str
) -> tuple[dict[str, dict[str, str]], list[Lesion]]:
    """Exhaustive annotation: listed categories are positive, the others negative; each boxed
    category of a kept image is a lesion (box in original pixels)."""
    found: dict[str, set] = {s: set() for s in SIDES}
    lesions = []
    for row in rows:
        view = f"{row['laterality']}_{row.get('view_position', '')}"
        for cat in _categories(row["finding_categories"]):
            if cat not in CATEGORY_MAP:
                result.problem(source, f"unknown finding category {cat!r}", exam_id)
                continue
            finding = CATEGORY_MAP[cat]
            if finding is None or row["laterality"] not in SIDES:
                continue
            found[row["laterality"]].add(finding)
            box = _box(row, *_size(row))
            if box is not None and row.get("image_id") in kept_images:
                lesions.append(Lesion(view, finding, box, parse_birads(row.get("finding_birads") or "")))
    return {s: {f: ("pos" if f in found[s] else "neg") for f in FINDINGS} for s in SIDES}, lesions


def ingest_vindr(root: str | Path) -> IngestResult:
    root = Path(root)
    result = IngestResult()
    breast = read_csv_checked(root / "breast-level_annotations.csv", BREAST_COLUMNS)
    finding_path = root / "finding_annotations.csv"
    finding_rows: dict[str, list[dict]] = {}
    if finding_path.exists():
        findings = read_csv_checked(finding_path, ["study_id", "laterality", "finding_categories"])
        for row in findings.to_dict("records"):
            finding_rows.setdefault(row["study_id"], []).append(row)
    reports, descriptors = {}, {}
    if (root / "reports.jsonl").exists():  # written by `mammorg synth` (not part of VinDr itself)
        rows = read_jsonl(root / "reports.jsonl")
        reports = {r["study_id"]: r.get("text") for r in rows}
        descriptors = {r["study_id"]: r["descriptors"] for r in rows if r.get("descriptors")}
    for study_id, rows in breast.groupby("study_id", sort=True):
        exam_id = "vindr-" + hash_id(study_id)
        views: dict[str, str] = {}
        birads: dict[str, str | None] = {}
        kept: set[str] = set()
        for _, row in rows.iterrows():
            view = f"{row['laterality']}_{row['view_position']}"
            rel = Path("images") / study_id / f"{row['image_id']}.dicom"
            if row["laterality"] not in ("L", "R") or row["view_position"] not in ("CC", "MLO"):
                result.problem(
                    root / "breast-level_annotations.csv",
                    f"image {hash_id(row['image_id'])}: unknown view {view}",
                    exam_id,
                )
                continue
            if view in views:
                result.problem(rel, f"duplicate view {view}; first kept", exam_id)
                continue
            if not (root / rel).is_file():
                result.problem(rel, "image file missing", exam_id)
                continue
            views[view] = str(rel)
            kept.add(row["image_id"])
            birads[row["laterality"]] = parse_birads(row["breast_birads"])
        if not views:
            result.problem(root / "breast-level_annotations.csv", "no usable view", exam_id)
            continue
        # per-breast density can differ within a study: the exam's is the denser breast's
        densities = {d for d in map(parse_density, rows["breast_density"]) if d is not None}
        side_findings: dict[str, dict[str, str]] = {}
        lesions: list[Lesion] = []
        if finding_path.exists():
            side_findings, lesions = _findings(finding_rows.get(study_id, []), kept, result, finding_path, exam_id)
        split = patient_split(study_id, dataset_split=rows["split"].iloc[0])
        result.exams.append(
            exam_row(
                exam_id,
                "vindr",
                split,
                views,
                max(densities) if densities else None,
                birads,
                side_findings,
                reports.get(study_id),
                {"manufacturer": None},
                descriptors.get(study_id),
                lesions,
            )
        )
    return result
