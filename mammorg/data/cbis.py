"""CBIS-DDSM adapter: the four case-description CSVs as published, rows grouped into exams.

Published quirks handled here (each has a test):
- the density column is ``breast_density`` in the mass files and ``breast density`` in the calc
  files; 0 (the calc test file) means unknown; descriptors use ``N/A``; assessment and subtlety
  can be 0 (assessment 0 is BI-RADS 0);
- CRLF line ends and quoted path fields that contain a newline;
- the ``mass shape`` column also names architectural distortions, lymph nodes and asymmetries,
  alone or combined (``IRREGULAR-ARCHITECTURAL_DISTORTION``): each becomes its own finding;
- the cropped-image and ROI-mask path columns are swapped between the mass and calc files, so
  the mask is recognised by its content (a binary image), not by its column;
- the image tree uses the CSV's UID folder names or, depending on the download tool, descriptive
  names (dates, series descriptions) under the same leading ``Mass-Training_P_00001_LEFT_CC``
  folder: both resolve.
ROI masks give each lesion's box in original-image pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom

from mammorg.data.common import IngestResult, exam_row, patient_split, read_csv_checked
from mammorg.io import MammorgError
from mammorg.labels import DENSITIES, canonical_descriptor, most_severe
from mammorg.privacy import hash_id
from mammorg.schema import Box, Exam, Lesion

ALIASES = {
    "breast_density": ["breast density"],
    "side": ["left or right breast"],
    "view": ["image view"],
    "image_path": ["image file path"],
    "crop_path": ["cropped image file path"],
    "mask_path": ["ROI mask file path"],
    "abnormality_type": ["abnormality type"],
    "mass_shape": ["mass shape"],
    "mass_margins": ["mass margins"],
    "calc_type": ["calc type"],
    "calc_distribution": ["calc distribution"],
}
REQUIRED = ["patient_id", "breast_density", "side", "view", "assessment", "image_path"]
CSV_NAMES = [f"{kind}_case_description_{split}_set.csv" for kind in ("mass", "calc") for split in ("train", "test")]
SHAPE_FINDINGS = {
    "ARCHITECTURAL_DISTORTION": "architectural_distortion",
    "LYMPH_NODE": "lymph_node",
    "ASYMMETRIC_BREAST_TISSUE": "asymmetry",
    "FOCAL_ASYMMETRIC_DENSITY": "asymmetry",
}
MASS_SHAPES = ("ROUND", "OVAL", "IRREGULAR", "LOBULATED")


def _tokens(value: str | None) -> list[str]:
    """``"ILL_DEFINED-SPICULATED"`` -> ``["ILL_DEFINED", "SPICULATED"]`` (``N/A`` and blanks dropped)."""
    return [t.strip().upper() for t in (value or "").split("-") if t.strip() and t.strip().upper() != "N/A"]


def mass_row_findings(shape: str | None) -> list[str]:
    """Findings of a row of the mass files: its shape may name other findings."""
    tokens = _tokens(shape)
    found = [SHAPE_FINDINGS[t] for t in tokens if t in SHAPE_FINDINGS]
    if any(t in MASS_SHAPES for t in tokens) or not found:
        found.insert(0, "mass")
    return list(dict.fromkeys(found))


def _descriptor(value: str | None) -> list[str]:
    return [t.lower().replace("_", " ") for t in _tokens(value)]


class ImageTree:
    """The DICOM files below the data root, indexed by their leading folder (the CSV path's first
    component), so the UID layout and the descriptive layout both resolve."""

    def __init__(self, root: Path):
        self.root = root
        self.by_folder: dict[str, list[Path]] = {}
        for base in (root, root / "CBIS-DDSM"):
            if not base.is_dir():
                continue
            for entry in sorted(p for p in base.iterdir() if p.is_dir()):
                files = sorted(Path(d) / f for d, _, names in os.walk(entry) for f in names if f.endswith(".dcm"))
                self.by_folder.setdefault(entry.name, []).extend(files)

    def candidates(self, csv_path: str) -> list[Path]:
        """Files a CSV path may mean: the exact path if it exists, else the files under its leading
        folder, the series whose descriptive name ends like the CSV's series UID first."""
        rel = csv_path.strip().replace("\\", "/")
        for exact in (self.root / rel, self.root / "CBIS-DDSM" / rel):
            if exact.is_file():
                return [exact]
        parts = [p for p in rel.split("/") if p]
        files = self.by_folder.get(parts[0], []) if parts else []
        series_tail = parts[-2][-5:] if len(parts) >= 3 else ""
        return sorted(files, key=lambda f: not (series_tail and f.parent.name.endswith(series_tail)))

    def full_image(self, csv_path: str) -> Path | None:
        files = self.candidates(csv_path)
        full = [f for f in files if "full mammogram" in f.parent.name.lower()]
        best = full or files
        return best[0] if best else None


def _pixels(path: Path) -> np.ndarray:
    try:
        return pydicom.dcmread(str(path)).pixel_array
    except Exception as exc:  # pydicom and its decoders raise many types
        raise MammorgError(f"{path}: unreadable DICOM ({str(exc).splitlines()[0]})") from None


def mask_box(tree: ImageTree, paths: Iterable[str], full_shape: tuple[int, int] | None) -> Box | None:
    """The box of the lesion's ROI mask: the binary image among the row's mask/crop paths
    (whichever column holds it), in the full image's pixels."""
    for csv_path in paths:
        for path in tree.candidates(csv_path):
            arr = _pixels(path)
            if arr.ndim != 2 or np.unique(arr).size > 2 or (full_shape and arr.shape != full_shape):
                continue  # the cropped image, not the mask
            ys, xs = np.nonzero(arr)
            if ys.size:
                return Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return None


def ingest_cbis(root: str | Path) -> IngestResult:
    root = Path(root)
    result = IngestResult()
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    present = [name for name in CSV_NAMES if (root / name).is_file()]
    if not present:
        raise MammorgError(f"{root}: no CBIS-DDSM case description CSV ({CSV_NAMES[0]} ...)")
    for name in present:
        df = read_csv_checked(root / name, REQUIRED, ALIASES)
        split = "test" if "_test_" in name else "train"
        kind = "mass" if name.startswith("mass") else "calcification"
        for row in df.to_dict("records"):
            groups.setdefault((row["patient_id"], split), []).append((kind, row))
    tree = ImageTree(root)
    for (patient, split), rows in sorted(groups.items()):
        exam = _exam(root, tree, patient, split, rows, result)
        if exam is not None:
            result.exams.append(exam)
    return result


def _exam(
    root: Path, tree: ImageTree, patient: str, split: str, rows: list[tuple[str, dict]], result: IngestResult
) -> Exam | None:
    exam_id = "cbis-" + hash_id(f"{patient}:{split}")
    views: dict[str, str | None] = {}
    shapes: dict[str, tuple[int, int]] = {}
    birads: dict[str, list[str]] = {"L": [], "R": []}
    findings: dict[str, dict[str, str]] = {"L": {}, "R": {}}
    densities, lesions, described = [], [], []
    for kind, row in rows:
        side = {"LEFT": "L", "RIGHT": "R"}.get(row["side"].upper())
        projection = row["view"].upper()
        if side is None or projection not in ("CC", "MLO"):
            result.problem(root, f"unknown side/view {row['side']}/{row['view']}", exam_id)
            continue
        view = f"{side}_{projection}"
        path = tree.full_image(row["image_path"])
        if path is None:
            result.problem(row["image_path"].strip(), "image file missing", exam_id)
            continue
        if view not in views:
            views[view] = str(path.relative_to(root))
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
            shapes[view] = (int(header.get("Rows", 0)), int(header.get("Columns", 0)))
        if row["assessment"] in {"0", "1", "2", "3", "4", "5"}:
            birads[side].append(row["assessment"])
        if row["breast_density"] in {"1", "2", "3", "4"}:
            densities.append(DENSITIES[int(row["breast_density"]) - 1])
        kinds = mass_row_findings(row.get("mass_shape")) if kind == "mass" else ["calcification"]
        for finding in kinds:
            findings[side][finding] = "pos"
        try:
            box = mask_box(tree, [row.get("mask_path") or "", row.get("crop_path") or ""], shapes.get(view))
        except MammorgError as exc:
            result.problem(row.get("mask_path", "").strip(), str(exc).split(": ", 1)[-1], exam_id)
            box = None
        lesion = {
            "side": side,
            "type": kind,
            "pathology": row.get("pathology"),
            "shape": _descriptor(row.get("mass_shape")),
            "margin": _descriptor(row.get("mass_margins")),
            "morphology": _descriptor(row.get("calc_type")),
            "distribution": _descriptor(row.get("calc_distribution")),
        }
        described.append(lesion)
        category = row["assessment"] if row["assessment"] in {"0", "1", "2", "3", "4", "5"} else None
        lesions += [Lesion(view, finding, box, category) for finding in kinds]
    if not views:
        result.problem(root, "no usable view", exam_id)
        return None
    side_birads = {s: most_severe(v) for s, v in birads.items()}
    return exam_row(
        exam_id,
        "cbis-ddsm",
        patient_split(patient, dataset_split=split),
        views,
        max(densities) if densities else None,
        side_birads,
        findings,
        meta={"lesions": described, "film": True},
        descriptors=side_descriptors(described),
        lesions=lesions,
    )


def side_descriptors(lesions: list[dict]) -> dict[str, dict[str, str]]:
    """First value in the label space per breast and descriptor (CBIS lists one per lesion)."""
    fields = {
        "mass_shape": "shape",
        "mass_margin": "margin",
        "calc_morphology": "morphology",
        "calc_distribution": "distribution",
    }
    out: dict[str, dict[str, str]] = {"L": {}, "R": {}}
    for lesion in lesions:
        for name, key in fields.items():
            for value in lesion.get(key) or []:
                canonical = canonical_descriptor(name, value)
                if canonical and name not in out[lesion["side"]]:
                    out[lesion["side"]][name] = canonical
    return out if any(out.values()) else {}
