"""Writing synthetic exams as DICOM MG files in the VinDr-Mammo layout, with reports and manifest."""

from __future__ import annotations

import csv
import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from mammorg.io import atomic_path, write_jsonl_atomic, write_text_atomic
from mammorg.labels import SIDES, VIEWS, birads_severity, canonical_descriptor
from mammorg.privacy import hash_id
from mammorg.schema import Box, Exam, Lesion
from mammorg.synth.findings import BENIGN_CALCS, lesion_birads, sample_exam
from mammorg.synth.phantom import FIELD_MM, render_view_with_boxes
from mammorg.synth.reports import REPORT_STYLES, report_labels, write_report

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST_CSV_COLUMNS = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "split",
]
FINDING_CSV_COLUMNS = [
    *BREAST_CSV_COLUMNS[:7],
    "breast_birads",
    "breast_density",
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
]


@dataclass
class SynthSettings:
    exams: int = 100
    seed: int = 0
    height: int = 512
    width: int = 256
    difficulty: float = 0.5
    label_noise: float = 0.03
    finding_rate: float = 0.55
    test_fraction: float = 0.15
    monochrome1_fraction: float = 0.3
    styles: tuple[str, ...] = field(default_factory=lambda: REPORT_STYLES)


def truth_descriptors(truth: dict) -> dict[str, dict[str, str]]:
    """Per breast, the descriptors of its most suspicious mass and calcification."""
    out: dict[str, dict[str, str]] = {}
    for side, breast in truth["breasts"].items():
        ranked = sorted(breast["lesions"], key=lambda x: birads_severity(lesion_birads(x) or "1"), reverse=True)
        found: dict[str, str | None] = {}
        for lesion in ranked:
            if lesion["type"] == "mass" and "mass_shape" not in found:
                found["mass_shape"], found["mass_margin"] = lesion["shape"], lesion["margin"]
            if lesion["type"] == "calcification" and "calc_morphology" not in found:
                found["calc_morphology"] = canonical_descriptor("calc_morphology", lesion["morphology"])
                found["calc_distribution"] = canonical_descriptor("calc_distribution", lesion["distribution"])
        out[side] = {k: v for k, v in found.items() if v}
    return out


def vindr_categories(lesion: dict) -> str:
    """VinDr-Mammo category name (benign calcification and normal nodes use extension names)."""
    kind = lesion["type"]
    if kind == "calcification":
        return "Calcification" if lesion["morphology"] in BENIGN_CALCS else "Suspicious Calcification"
    if kind == "lymph_node":
        return "Suspicious Lymph Node" if lesion["enlarged"] else "Lymph Node"
    return {
        "mass": "Mass",
        "asymmetry": "Focal Asymmetry",
        "architectural_distortion": "Architectural Distortion",
        "skin_thickening": "Skin Thickening",
        "nipple_retraction": "Nipple Retraction",
    }[kind]


def to_stored(img: np.ndarray, bits: int, monochrome1: bool) -> np.ndarray:
    top = 2**bits - 1
    raw = np.round(img * top).astype(np.uint16)
    return (top - raw).astype(np.uint16) if monochrome1 else raw


def dicom_dataset(pixels: np.ndarray, view: str, ids: dict, rng: np.random.Generator) -> Dataset:
    """A Digital Mammography X-Ray Image (for presentation) with realistic tags."""
    side, proj = view.split("_")
    bits = int(rng.choice((12, 14)))
    mono1 = bool(rng.random() < ids["monochrome1_fraction"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = ids["sop_uid"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MG_FOR_PRESENTATION, ids["sop_uid"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ids["study_uid"], ids["series_uid"]
    ds.Modality, ds.Manufacturer = "MG", "mammorg-synth"
    ds.PatientName, ds.PatientID = ids["patient_name"], ids["patient_id"]
    ds.PatientBirthDate, ds.AccessionNumber = ids["birth_date"], ids["accession"]
    ds.StudyDate = "20260101"
    ds.ImageLaterality, ds.ViewPosition = side, proj
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        _VIEW_CODES[proj][0],
        "SCT",
        _VIEW_CODES[proj][1],
    )
    ds.ViewCodeSequence = [code]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    spacing = round(FIELD_MM / pixels.shape[0], 4)
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    sigmoid = bool(rng.random() < 0.2)
    ds.VOILUTFunction = "SIGMOID" if sigmoid else "LINEAR"
    # a sigmoid needs a narrower width to keep the background near black
    ds.WindowCenter, ds.WindowWidth = (2**bits) // 2, 2 ** (bits - 1) if sigmoid else 2**bits
    ds.PixelData = to_stored(pixels, bits, mono1).tobytes()
    return ds


def _exam_ids(rng: np.random.Generator, index: int, seed: int) -> dict:
    study = f"{seed:04d}{index:06d}" + "".join(rng.choice(list("0123456789abcdef"), 20))
    return {
        "study_id": study,
        "study_uid": generate_uid(entropy_srcs=[study]),
        "series_uid": generate_uid(entropy_srcs=[study, "series"]),
        "patient_name": f"SYNTH^PATIENT{index:05d}",
        "patient_id": f"SP{seed:03d}{index:06d}",
        "birth_date": f"19{50 + index % 40:02d}0{1 + index % 9}15",
        "accession": f"ACC{seed:03d}{index:07d}",
    }


def _write_dicom(ds: Dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def draw_exam(index: int, settings: SynthSettings) -> tuple[dict, np.random.Generator]:
    """Exam ``index`` before rendering (``ids``, ``truth``, ``split``, ``style``, ``report``) and
    the generator its rendering goes on with; deterministic in (seed, index)."""
    rng = np.random.default_rng([settings.seed, index])
    truth = sample_exam(rng, settings.label_noise, settings.finding_rate)
    ids = _exam_ids(rng, index, settings.seed)
    split = "test" if rng.random() < settings.test_fraction else "training"
    style = str(rng.choice(settings.styles))
    report = write_report(truth, style, rng)
    return {"ids": ids, "truth": truth, "split": split, "style": style, "report": report}, rng


def synthesise_exam(index: int, settings: SynthSettings, root: Path) -> dict:
    """Render, write and describe exam ``index``; deterministic in (seed, index)."""
    exam, rng = draw_exam(index, settings)
    truth, ids = exam["truth"], exam["ids"]
    images = {}
    for view in VIEWS:
        pixels, boxes = render_view_with_boxes(truth, view, settings.height, settings.width, rng, settings.difficulty)
        image_id = hash_id(f"{ids['study_id']}:{view}", salt="synth-image", length=24)
        view_ids = {
            **ids,
            "sop_uid": generate_uid(entropy_srcs=[ids["study_id"], view]),
            "monochrome1_fraction": settings.monochrome1_fraction,
        }
        rel = Path("images") / ids["study_id"] / f"{image_id}.dicom"
        _write_dicom(dicom_dataset(pixels, view, view_ids, rng), root / rel)
        images[view] = {"image_id": image_id, "path": str(rel), "boxes": boxes}
    return {**exam, "images": images}


def _breast_rows(exam: dict, settings: SynthSettings) -> tuple[list[list], list[list]]:
    breast_rows, finding_rows = [], []
    truth, ids = exam["truth"], exam["ids"]
    for view, image in exam["images"].items():
        side, proj = view.split("_")
        birads = f"BI-RADS {truth['breasts'][side]['birads']}"
        density = f"DENSITY {truth['density'].upper()}"
        base = [
            ids["study_id"],
            ids["series_uid"],
            image["image_id"],
            side,
            proj,
            settings.height,
            settings.width,
        ]
        breast_rows.append([*base, birads, density, exam["split"]])
        lesions = truth["breasts"][side]["lesions"]
        boxed = dict(image["boxes"])
        # one row per boxed lesion (VinDr: one row per box), one for the features without a box
        for index, (x0, y0, x1, y1) in sorted(boxed.items()):
            lesion = lesions[index]
            category = f"BI-RADS {lesion_birads(lesion)}"
            finding_rows.append(
                [*base, birads, density, str([vindr_categories(lesion)]), category, x0, y0, x1, y1, exam["split"]]
            )
        unboxed = [
            x for i, x in enumerate(lesions) if x["type"] in ("skin_thickening", "nipple_retraction") and i not in boxed
        ]
        if unboxed or not boxed:
            cats = sorted({vindr_categories(x) for x in unboxed}) or ["No Finding"]
            finding_rows.append(
                [*base, birads, density, str(cats), birads if unboxed else "", "", "", "", "", exam["split"]]
            )
    return breast_rows, finding_rows


def _lesions(exam: dict) -> list[Lesion]:
    """Every lesion's box on every view it is drawn on (original-image pixels)."""
    out = []
    for view in VIEWS:
        lesions = exam["truth"]["breasts"][view.split("_")[0]]["lesions"]
        for index, box in exam["images"][view]["boxes"]:
            lesion = lesions[index]
            out.append(Lesion(view, lesion["type"], Box(*box), lesion_birads(lesion)))
    return out


def _csv_text(columns: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def manifest_row(exam: dict) -> Exam:
    """Canonical manifest line (docs/design.md section 4) for a synthetic exam; identifiers hashed."""
    ids, truth = exam["ids"], exam["truth"]
    split = (
        "test"
        if exam["split"] == "test"
        else ("val" if int(hash_id(ids["study_id"], salt="split"), 16) % 100 < 15 else "train")
    )
    return Exam(
        "synth-" + hash_id(ids["study_id"]),
        "synth",
        split,
        {v: exam["images"][v]["path"] for v in VIEWS},
        report_labels(truth, exam["style"]),
        exam["report"],
        {
            "manufacturer": "mammorg-synth",
            "source_ids_hashed": True,
            "report_style": exam["style"],
            "lesions": {s: truth["breasts"][s]["lesions"] for s in SIDES},
        },
        lesions=_lesions(exam),
    )


def synthesise(out: str | Path, settings: SynthSettings, progress: bool = True, workers: int = 1) -> dict:
    """Write ``settings.exams`` exams under ``out`` (VinDr layout + reports.jsonl + manifest.jsonl);
    each exam depends only on (seed, index), so ``workers`` processes write the same files."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    indices = range(settings.exams)
    bar = partial(tqdm, total=settings.exams, desc="synth", unit="exam", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            exams = list(bar(pool.map(synthesise_exam, indices, repeat(settings), repeat(root), chunksize=4)))
    else:
        exams = [synthesise_exam(i, settings, root) for i in bar(indices)]
    breast_rows, finding_rows = [], []
    for exam in exams:
        b, f = _breast_rows(exam, settings)
        breast_rows += b
        finding_rows += f
    write_text_atomic(root / "breast-level_annotations.csv", _csv_text(BREAST_CSV_COLUMNS, breast_rows))
    write_text_atomic(root / "finding_annotations.csv", _csv_text(FINDING_CSV_COLUMNS, finding_rows))
    write_jsonl_atomic(
        root / "reports.jsonl",
        (
            {
                "study_id": e["ids"]["study_id"],
                "style": e["style"],
                "text": e["report"],
                "descriptors": truth_descriptors(e["truth"]),
            }
            for e in exams
        ),
    )
    write_jsonl_atomic(root / "manifest.jsonl", (manifest_row(e) for e in exams))
    return {"exams": len(exams), "views": 4 * len(exams), "out": str(root)}
