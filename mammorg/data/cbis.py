"""CBIS-DDSM adapter: mass and calcification case CSVs, rows grouped into exams."""

from __future__ import annotations

from pathlib import Path

from mammorg.data.common import IngestResult, exam_row, patient_split, read_csv_checked
from mammorg.io import MammorgError
from mammorg.labels import DENSITIES, canonical_descriptor, most_severe
from mammorg.privacy import hash_id
from mammorg.schema import Exam

ALIASES = {
    "breast_density": ["breast density"],
    "side": ["left or right breast"],
    "view": ["image view"],
    "image_path": ["image file path"],
    "abnormality_type": ["abnormality type"],
    "mass_shape": ["mass shape"],
    "mass_margins": ["mass margins"],
    "calc_type": ["calc type"],
    "calc_distribution": ["calc distribution"],
}
REQUIRED = ["patient_id", "breast_density", "side", "view", "assessment", "image_path"]
CSV_NAMES = [
    f"{kind}_case_description_{split}_set.csv" for kind in ("mass", "calc") for split in ("train", "test")
]


def _image_path(root: Path, raw: str) -> Path | None:
    rel = raw.strip().replace("\\", "/")
    for candidate in (root / rel, root / "CBIS-DDSM" / rel):
        if candidate.is_file():
            return candidate
    return None


def _descriptor(value: str) -> list[str]:
    return [v.lower().replace("_", " ") for v in value.split("-") if v and v != "N/A"]


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
    for (patient, split), rows in sorted(groups.items()):
        exam = _exam(root, patient, split, rows, result)
        if exam is not None:
            result.exams.append(exam)
    return result


def _exam(root: Path, patient: str, split: str, rows: list, result: IngestResult) -> Exam | None:
    exam_id = "cbis-" + hash_id(f"{patient}:{split}")
    views: dict[str, str] = {}
    birads: dict[str, list[str]] = {"L": [], "R": []}
    findings: dict[str, dict] = {"L": {}, "R": {}}
    densities, descriptors = [], []
    for kind, row in rows:
        side = {"LEFT": "L", "RIGHT": "R"}.get(row["side"].upper())
        if side is None or row["view"].upper() not in ("CC", "MLO"):
            result.problem(root, f"unknown side/view {row['side']}/{row['view']}", exam_id)
            continue
        path = _image_path(root, row["image_path"])
        if path is None:
            result.problem(row["image_path"].strip(), "image file missing", exam_id)
            continue
        views.setdefault(f"{side}_{row['view'].upper()}", str(path.relative_to(root)))
        if row["assessment"] in {"0", "1", "2", "3", "4", "5"}:
            birads[side].append(row["assessment"])
        if row["breast_density"] in {"1", "2", "3", "4"}:
            densities.append(DENSITIES[int(row["breast_density"]) - 1])
        findings[side][kind] = "pos"
        descriptors.append(
            {
                "side": side,
                "type": kind,
                "pathology": row.get("pathology"),
                "shape": _descriptor(row.get("mass_shape", "")),
                "margin": _descriptor(row.get("mass_margins", "")),
                "morphology": _descriptor(row.get("calc_type", "")),
                "distribution": _descriptor(row.get("calc_distribution", "")),
            }
        )
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
        meta={"lesions": descriptors, "film": True},
        descriptors=side_descriptors(descriptors),
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
