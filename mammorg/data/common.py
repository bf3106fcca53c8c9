"""Shared pieces of the dataset adapters: problems, splits, CSV reading, manifest rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mammorg.io import MammorgError
from mammorg.labels import SIDES
from mammorg.privacy import hash_id
from mammorg.schema import Exam, Labels, Lesion, StructuredReport

# Reads a report's text into what it states; the application layer passes the evaluation
# parser, so the adapters (base floor) never import a stage package.
ReportReader = Callable[[str], StructuredReport]


@dataclass
class Problem:
    """One bad item met by an adapter: where, which exam, what."""

    source: str
    problem: str
    exam_id: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class IngestResult:
    """Exams read by an adapter, and the problems met on the way (one per bad item)."""

    exams: list[Exam] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, source: str | Path, message: str, exam_id: str | None = None) -> None:
        self.problems.append(Problem(str(source), message, exam_id))


def patient_split(
    patient_key: str, val_fraction: float = 0.1, test_fraction: float = 0.1, dataset_split: str | None = None
) -> str:
    """Deterministic split by hashed patient; a dataset's own test split is kept."""
    if dataset_split == "test":
        return "test"
    bucket = int(hash_id(patient_key, salt="split"), 16) % 1000 / 1000
    if dataset_split in ("train", "training"):
        return "val" if bucket < val_fraction else "train"
    if bucket < test_fraction:
        return "test"
    return "val" if bucket < test_fraction + val_fraction else "train"


def read_csv_checked(path: Path, required: list[str], aliases: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Read a CSV as strings; rename known aliases; a missing column names file and column."""
    if not path.is_file():
        raise MammorgError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise MammorgError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
    df.columns = [c.strip() for c in df.columns]
    for canonical, names in (aliases or {}).items():
        for name in names:
            if name in df.columns and canonical not in df.columns:
                df = df.rename(columns={name: canonical})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MammorgError(f"{path}: missing column(s) {', '.join(missing)}")
    return df.apply(lambda col: col.str.strip())


def exam_row(
    exam_id: str,
    dataset: str,
    split: str,
    views: Mapping[str, str | None],
    density: str | None,
    birads: Mapping[str, str | None],
    findings: dict[str, dict],
    report: str | None = None,
    meta: dict | None = None,
    descriptors: dict[str, dict] | None = None,
    lesions: list[Lesion] | None = None,
) -> Exam:
    """A canonical manifest line (docs/design.md section 4); descriptors only when known."""
    return Exam(
        exam_id,
        dataset,
        split,
        dict(views),
        Labels.make(density, birads, findings, descriptors),
        report,
        {**(meta or {}), "source_ids_hashed": True},
        list(lesions or []),
    )


def labels_from_report(
    read_report: ReportReader, text: str | None, side_for_unlateralised: str | None = None
) -> StructuredReport:
    """What a report states (empty when there is none); for a single-image exam, findings and
    the exam category with no side are given to the imaged side."""
    if not text:
        return StructuredReport()
    parsed = read_report(text)
    if side_for_unlateralised:
        parsed.findings[side_for_unlateralised].update(parsed.findings.get("U") or {})
        if parsed.birads.get(side_for_unlateralised) is None:
            parsed.birads[side_for_unlateralised] = parsed.birads.get("exam")
    parsed.findings = {s: parsed.findings.get(s) or {} for s in SIDES}
    return parsed


def read_text_report(path: Path, result: IngestResult, exam_id: str) -> str | None:
    """A report file's text, or None with a recorded problem when it cannot be decoded."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        try:
            text = path.read_text(encoding="cp1252").strip()
        except UnicodeDecodeError:
            result.problem(path, "report text is not UTF-8 or cp1252; report dropped", exam_id)
            return None
        result.problem(path, "report text is not UTF-8; read as cp1252", exam_id)
        return text
