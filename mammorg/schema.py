"""Typed records handed between stages, with their JSON forms (docs/design.md, sections 4 and 5).

- ``Exam``: one manifest line (views, labels, report, annotated lesions, cache entries);
- ``Stage1Prediction``: stage 1's probabilities and decided labels for one exam;
- ``StructuredReport``: what a report states (parser output, or labels seen as a report).

Every record has ``to_json`` (plain JSON types, the on-disk form) and ``from_json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammorg.labels import SIDES, VIEWS, most_severe

FindingStates = dict[str, str]  # finding -> "pos" | "neg" | "unc"
REPORT_SIDES: tuple[str, ...] = (*SIDES, "U")  # U: side not stated (single-image reports)


def _side_map(raw: Mapping | None, sides: tuple[str, ...] = SIDES) -> dict[str, dict]:
    raw = raw or {}
    return {s: dict(raw.get(s) or {}) for s in sides}


@dataclass
class Box:
    """An axis-aligned box in pixel coordinates of the original image (VinDr's columns)."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float

    def to_json(self) -> list[float]:
        return [round(float(v), 2) for v in (self.xmin, self.ymin, self.xmax, self.ymax)]

    @classmethod
    def from_json(cls, raw: list[float] | dict) -> Box:
        if isinstance(raw, dict):
            return cls(float(raw["xmin"]), float(raw["ymin"]), float(raw["xmax"]), float(raw["ymax"]))
        return cls(*(float(v) for v in raw))

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        return (self.xmin + self.xmax) / 2, (self.ymin + self.ymax) / 2

    def clipped(self, width: float, height: float) -> Box:
        """The part inside a ``width`` x ``height`` image (published boxes can stick out)."""
        return Box(
            min(max(self.xmin, 0.0), width),
            min(max(self.ymin, 0.0), height),
            min(max(self.xmax, 0.0), width),
            min(max(self.ymax, 0.0), height),
        )

    @property
    def empty(self) -> bool:
        return self.xmax <= self.xmin or self.ymax <= self.ymin


@dataclass
class Lesion:
    """One annotated lesion seen on one view; ``box`` in original-image pixels (None: unknown)."""

    view: str
    finding: str
    box: Box | None = None
    birads: str | None = None
    descriptors: dict[str, str] = field(default_factory=dict)

    @property
    def side(self) -> str:
        return self.view.split("_", 1)[0]

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "view": self.view,
            "finding": self.finding,
            "box": self.box.to_json() if self.box else None,
        }
        if self.birads:
            out["birads"] = self.birads
        if self.descriptors:
            out["descriptors"] = dict(self.descriptors)
        return out

    @classmethod
    def from_json(cls, raw: dict) -> Lesion:
        box = raw.get("box")
        return cls(
            raw["view"],
            raw["finding"],
            Box.from_json(box) if box is not None else None,
            raw.get("birads"),
            dict(raw.get("descriptors") or {}),
        )


@dataclass
class Labels:
    """Exam labels (docs/design.md section 4): density, BI-RADS per side and exam, findings per
    side (pos/neg/unc; a finding not mentioned is absent) and optional lesion descriptors."""

    density: str | None = None
    birads: dict[str, str | None] = field(default_factory=lambda: {"L": None, "R": None, "exam": None})
    findings: dict[str, FindingStates] = field(default_factory=lambda: _side_map(None))
    descriptors: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        density: str | None,
        birads: Mapping[str, str | None],
        findings: Mapping[str, dict],
        descriptors: Mapping[str, dict] | None = None,
    ) -> Labels:
        """Labels with the exam category filled in as the most severe side's when not given."""
        sides = {s: birads.get(s) for s in SIDES}
        exam = birads.get("exam") or most_severe(list(sides.values()))
        desc = {s: dict((descriptors or {}).get(s) or {}) for s in SIDES} if descriptors else {}
        return cls(density, {**sides, "exam": exam}, _side_map(findings), desc)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "density": self.density,
            "birads": dict(self.birads),
            "findings": _side_map(self.findings),
        }
        if self.descriptors:
            out["descriptors"] = _side_map(self.descriptors)
        return out

    @classmethod
    def from_json(cls, raw: dict | None) -> Labels:
        raw = raw or {}
        birads = raw.get("birads") or {}
        return cls(
            raw.get("density"),
            {k: birads.get(k) for k in (*SIDES, "exam")},
            _side_map(raw.get("findings")),
            _side_map(raw["descriptors"]) if raw.get("descriptors") else {},
        )


@dataclass
class Exam:
    """One manifest line. View paths are relative to the manifest's folder unless absolute;
    ``cache`` (preprocessed manifests only) maps views to cache entries, ``geometry`` to the
    preprocessing geometry that maps original-image pixels to cached ones."""

    exam_id: str
    dataset: str
    split: str
    views: dict[str, str | None]
    labels: Labels = field(default_factory=Labels)
    report: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    lesions: list[Lesion] = field(default_factory=list)
    cache: dict[str, str] | None = None
    geometry: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.views = {v: self.views.get(v) for v in VIEWS}

    def view_path(self, view: str, base: Path) -> Path | None:
        """The image file of ``view`` (resolved against the manifest folder ``base``)."""
        value = self.views.get(view)
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else base / path

    @property
    def present_views(self) -> list[str]:
        return [v for v in VIEWS if self.views.get(v)]

    @property
    def report_origin(self) -> str | None:
        """``"templated"`` for reports written from labels (``mammorg data reports``), else the
        data set's own text (None when there is no report)."""
        if not self.report:
            return None
        return str(self.meta.get("report_origin", "original"))

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "exam_id": self.exam_id,
            "dataset": self.dataset,
            "split": self.split,
            "views": dict(self.views),
            "labels": self.labels.to_json(),
            "report": self.report,
            "meta": dict(self.meta),
        }
        if self.lesions:
            out["lesions"] = [x.to_json() for x in self.lesions]
        if self.cache is not None:
            out["cache"] = dict(self.cache)
        if self.geometry:
            out["geometry"] = dict(self.geometry)
        return out

    @classmethod
    def from_json(cls, raw: dict) -> Exam:
        return cls(
            str(raw["exam_id"]),
            str(raw.get("dataset", "")),
            str(raw.get("split", "")),
            dict(raw.get("views") or {}),
            Labels.from_json(raw.get("labels")),
            raw.get("report"),
            dict(raw.get("meta") or {}),
            [Lesion.from_json(x) for x in raw.get("lesions") or []],
            dict(raw["cache"]) if raw.get("cache") is not None else None,
            dict(raw.get("geometry") or {}),
        )


@dataclass
class StructuredReport:
    """What a report states (docs/design.md section 5): density, BI-RADS per side and for the
    exam, findings per side (``U``: side not stated) and, where the text gives them, finding
    locations (``{"side", "finding", "quadrant", "clock", "depth", "distance_cm"}``)."""

    density: str | None = None
    birads: dict[str, str | None] = field(default_factory=lambda: {"L": None, "R": None, "exam": None})
    findings: dict[str, FindingStates] = field(default_factory=lambda: _side_map(None, REPORT_SIDES))
    locations: list[dict[str, Any]] = field(default_factory=list)

    def positives(self) -> list[tuple[str, str]]:
        """(side, finding) pairs stated present."""
        return [(s, f) for s in REPORT_SIDES for f, v in (self.findings.get(s) or {}).items() if v == "pos"]

    @classmethod
    def from_labels(cls, labels: Labels) -> StructuredReport:
        """Labels seen as a report that states them (stage-1 decisions scored like reports)."""
        return cls(labels.density, dict(labels.birads), {**_side_map(labels.findings), "U": {}})

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "density": self.density,
            "birads": dict(self.birads),
            "findings": _side_map(self.findings, REPORT_SIDES),
        }
        if self.locations:
            out["locations"] = [dict(x) for x in self.locations]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> StructuredReport:
        birads = raw.get("birads") or {}
        return cls(
            raw.get("density"),
            {k: birads.get(k) for k in (*SIDES, "exam")},
            _side_map(raw.get("findings"), REPORT_SIDES),
            list(raw.get("locations") or []),
        )


@dataclass
class HeadProbabilities:
    """Stage-1 probabilities of one exam; a side without a view has None."""

    density: dict[str, float]
    birads: dict[str, dict[str, float] | None]
    findings: dict[str, dict[str, float] | None]
    descriptors: dict[str, dict[str, dict[str, float]] | None] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"density": self.density, "birads": self.birads, "findings": self.findings}
        if self.descriptors is not None:
            out["descriptors"] = self.descriptors
        return out

    @classmethod
    def from_json(cls, raw: dict) -> HeadProbabilities:
        return cls(dict(raw["density"]), dict(raw["birads"]), dict(raw["findings"]), raw.get("descriptors"))


@dataclass
class GroundedFinding:
    """A finding stage 1 localised: the view, the box in original-image pixels, the score and
    the location derived from the CC/MLO pair (quadrant, clock position, depth)."""

    side: str
    finding: str
    score: float
    view: str | None = None
    box: Box | None = None
    location: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "side": self.side,
            "finding": self.finding,
            "score": round(float(self.score), 4),
            "view": self.view,
            "box": self.box.to_json() if self.box else None,
            "location": dict(self.location),
        }

    @classmethod
    def from_json(cls, raw: dict) -> GroundedFinding:
        box = raw.get("box")
        return cls(
            raw["side"],
            raw["finding"],
            float(raw["score"]),
            raw.get("view"),
            Box.from_json(box) if box is not None else None,
            dict(raw.get("location") or {}),
        )


@dataclass
class Stage1Prediction:
    """One ``stage1 predict`` line: probabilities, labels decided at the run's operating points
    (``pred``), where the prediction came from (``source``: the run's model or an out-of-fold
    model), the feature-token file for stage 2 and the grounded findings."""

    exam_id: str
    views: list[str]
    probs: HeadProbabilities
    pred: Labels
    source: str = "model"
    features: str | None = None
    grounded: list[GroundedFinding] = field(default_factory=list)

    def side_present(self, side: str) -> bool:
        return self.probs.birads.get(side) is not None

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "exam_id": self.exam_id,
            "views": list(self.views),
            "probs": self.probs.to_json(),
            "pred": self.pred.to_json(),
            "source": self.source,
        }
        if self.features is not None:
            out["features"] = self.features
        if self.grounded:
            out["grounded"] = [g.to_json() for g in self.grounded]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> Stage1Prediction:
        return cls(
            raw["exam_id"],
            list(raw.get("views") or []),
            HeadProbabilities.from_json(raw["probs"]),
            Labels.from_json(raw["pred"]),
            raw.get("source", "model"),
            raw.get("features"),
            [GroundedFinding.from_json(g) for g in raw.get("grounded") or []],
        )


def _read_records(path: str | Path, record: Any, what: str) -> list[Any]:
    from mammorg.io import MammorgError, read_jsonl

    out = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            out.append(record.from_json(row))
        except (KeyError, TypeError, ValueError) as exc:
            raise MammorgError(f"{path}:{lineno}: not {what} ({type(exc).__name__}: {exc})") from None
    return out


def read_manifest(path: str | Path) -> list[Exam]:
    """The exams of a manifest (JSONL); a line that is not an exam names the file and line."""
    return _read_records(path, Exam, "a manifest line")


def read_predictions(path: str | Path) -> list[Stage1Prediction]:
    """The records of a ``stage1 predict`` output."""
    return _read_records(path, Stage1Prediction, "a stage-1 prediction")
