"""Reports for new exams from an exported bundle, fully offline: the Python API behind
``mammorg report`` and ``mammorg serve``.

    reporter = ExamReporter.load("bundle")          # verify and load once
    report = reporter.report_files(["exam_folder"])  # or four DICOM/PNG files
    report.text, report.structured, report.stage1   # typed; report.to_json() for JSON

Views are preprocessed exactly as the training cache was (same spec, same uint16 quantisation);
stage 1 gives probabilities, decisions and feature tokens; the bundle's ``Reporter`` writes the
report. A missing view is recorded in ``missing_views`` and ``flags``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from mammorg.app.bundle import Bundle, load_bundle, rehash
from mammorg.geometry import GEOMETRY_KEYS
from mammorg.io import MammorgError, write_text_atomic
from mammorg.labels import SIDES, VIEWS
from mammorg.preprocess import PreprocessSpec, from_uint16, preprocess_dataset, preprocess_file, to_uint16
from mammorg.raster import RASTER_SUFFIXES
from mammorg.schema import Stage1Prediction, StructuredReport
from stage1_classification.inference import exam_record
from stage1_classification.localisation import grounded_findings
from stage2_sft.knowledge import KnowledgeState

IMAGE_SUFFIXES = (".dcm", ".dicom", *RASTER_SUFFIXES)
PIXEL_DATA = 0x7FE00010


@dataclass
class ExamViews:
    """An exam's views preprocessed like the training cache, with each view's preprocessing
    geometry (to map stage 1's boxes back to the original images)."""

    images: dict[str, np.ndarray]
    geometry: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)  # DICOM headers (no pixels) per view
    names: dict[str, str] = field(default_factory=dict)  # the file (or upload) each view came from

    def add(self, view: str, img: np.ndarray, meta: dict, name: str, header: pydicom.Dataset | None) -> None:
        """One preprocessed view (quantised like the training cache); a second one of a view is refused."""
        if view in self.images:
            raise MammorgError(f"{name}: a second {view} view (first: {self.names[view]})")
        self.images[view], self.names[view] = from_uint16(to_uint16(img)), name
        self.geometry[view] = {k: meta[k] for k in GEOMETRY_KEYS}
        if header is not None:
            self.sources[view] = header


def _header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A dataset's elements without its pixel data (the dataset itself is left as it is)."""
    header = pydicom.Dataset()
    for element in ds:
        if element.tag != PIXEL_DATA:
            header.add(element)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


@dataclass
class Stage1Result:
    """Stage 1's output for one exam, as the generator takes it."""

    record: Stage1Prediction
    tokens: torch.Tensor
    mask: torch.Tensor
    heat: torch.Tensor | None


@dataclass
class ExamReport:
    """The report of one exam: narrative, what it states, stage 1's view of the exam, the views
    used and any flags (a missing view, ...)."""

    text: str
    structured: StructuredReport
    stage1: Stage1Prediction
    views: list[str]
    missing_views: list[str]
    flags: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exam_views: ExamViews | None = None  # the preprocessed views (for pages), not serialised
    heatmaps: torch.Tensor | None = None  # stage-1 finding heatmaps [4, F, h, w] when it localises

    def to_sr(self) -> Any:
        """The report as a DICOM Comprehensive SR referencing the exam's DICOM images."""
        from mammorg.app.sr import structured_report

        sources = self.exam_views.sources if self.exam_views else {}
        return structured_report(self.text, self.stage1.grounded, sources)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "structured": self.structured.to_json(),
            "stage1": {
                "probs": self.stage1.probs.to_json(),
                "pred": self.stage1.pred.to_json(),
                "grounded": [g.to_json() for g in self.stage1.grounded],
            },
            "views": self.views,
            "missing_views": self.missing_views,
            "flags": self.flags,
            "seconds": round(self.seconds, 3),
        }


def exam_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files of one exam: a folder's images, or the files given."""
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        files = sorted(p for p in paths[0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MammorgError(f"{paths[0]}: no DICOM or PNG files in this folder")
        return files
    for p in paths:
        if not p.is_file():
            raise MammorgError(f"{p}: file not found")
    return paths


class ViewLoader:
    """Reads an exam's views (files, or in-memory DICOM datasets) and preprocesses them like the
    training cache (the bundle's spec, the same uint16 quantisation). Needs no model: the
    service's front uses it alone when the model runs in worker processes."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec

    def load_views(self, files: Iterable[Path]) -> ExamViews:
        """Preprocess each file like the training cache (same spec, same uint16 quantisation)."""
        files = list(files)
        if len(files) > len(VIEWS):
            raise MammorgError(f"{files[0].parent}: {len(files)} images; an exam has at most four views")
        views = ExamViews({})
        for path in files:
            img, view, meta = preprocess_file(path, self.spec, require_view=True)
            raster = path.suffix.lower() in RASTER_SUFFIXES
            header = None if raster else pydicom.dcmread(str(path), stop_before_pixels=True)
            views.add(view, img, meta, str(path), header)
        return views

    def load_datasets(self, datasets: Sequence[Any]) -> ExamViews:
        """Preprocess an exam given as in-memory DICOM datasets (``pydicom.Dataset``), decoded
        where they are (errors name them "file 1", "file 2", ... in the order given)."""
        if len(datasets) > len(VIEWS):
            raise MammorgError(f"{len(datasets)} images; an exam has at most four views")
        views = ExamViews({})
        for i, ds in enumerate(datasets):
            name = f"file {i + 1}"
            img, view, meta = preprocess_dataset(ds, name, self.spec, require_view=True)
            views.add(view, img, meta, name, _header(ds))
        return views


class ExamReporter:
    """A loaded bundle that reports on exams (see the module docstring)."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.views = ViewLoader(bundle.spec)

    @classmethod
    def load(cls, folder: str | Path, trust_pickle: bool = False, device: str = "cpu") -> ExamReporter:
        return cls(load_bundle(folder, trust_pickle, device))

    def load_views(self, files: Iterable[Path]) -> ExamViews:
        """Preprocess each file like the training cache (``ViewLoader.load_views``)."""
        return self.views.load_views(files)

    @torch.no_grad()
    def stage1(self, exams: Sequence[ExamViews]) -> list[Stage1Result]:
        """Stage 1 on the preprocessed views of one or more exams (one batch): per exam the
        prediction (grounded findings when the model localises), feature tokens ``[4, N, D]``,
        view mask ``[4]`` and heatmap probabilities (None without localisation)."""
        if not exams or any(not views.images for views in exams):
            raise MammorgError("an exam with no usable view cannot be reported")
        shape = next(iter(exams[0].images.values())).shape
        images = torch.stack(
            [
                torch.stack([torch.from_numpy(x.images[v]) if v in x.images else torch.zeros(shape) for v in VIEWS])
                for x in exams
            ]
        ).unsqueeze(2)
        mask = torch.tensor([[v in x.images for v in VIEWS] for x in exams])
        device = next(self.bundle.stage1.parameters()).device
        out = {k: v.float().cpu() for k, v in self.bundle.stage1(images.to(device), mask.to(device)).items()}
        results = []
        for i, views in enumerate(exams):
            descriptors = {k[5:]: v[i].softmax(-1) for k, v in out.items() if k.startswith("desc_")}
            record = exam_record(
                "exam",
                out["density"][i].softmax(-1),
                out["birads"][i].softmax(-1),
                out["findings"][i].sigmoid(),
                mask[i],
                descriptors,
                self.bundle.stage1_points,
            )
            heat = out["heatmaps"][i].sigmoid() if "heatmaps" in out else None
            if heat is not None:
                positive = {s: [f for f, v in record.pred.findings[s].items() if v == "pos"] for s in SIDES}
                record.grounded = grounded_findings(positive, heat, images[i], mask[i], views.geometry)
            results.append(Stage1Result(record, out["tokens"][i], mask[i], heat))
        return results

    def report_many(self, exams: Sequence[ExamViews]) -> list[ExamReport]:
        """Reports of several exams in one batch (stage 1 and generation batched): what the
        service does with requests that arrive together."""
        t0 = time.perf_counter()
        results = self.stage1(exams)
        reporter = self.bundle.reporter
        samples = [
            reporter.builder.sample("exam", r.tokens, r.mask, KnowledgeState.from_prediction(r.record)) for r in results
        ]
        generated = reporter.generate(samples, batch_size=max(len(samples), 1))
        seconds = time.perf_counter() - t0
        reports = []
        for views, result, gen in zip(exams, results, generated):
            missing = [v for v in VIEWS if v not in views.images]
            flags = [f"generated without view(s): {', '.join(missing)}"] if missing else []
            reports.append(
                ExamReport(
                    gen.text,
                    gen.structured,
                    result.record,
                    sorted(views.images),
                    missing,
                    flags,
                    seconds,
                    views,
                    result.heat,
                )
            )
        return reports

    def report_views(self, views: ExamViews) -> ExamReport:
        """Stage 1 -> knowledge + visual tokens -> stage 2 -> narrative and structured report.
        At inference the knowledge is always stage 1's prediction."""
        return self.report_many([views])[0]

    def report_files(self, inputs: Sequence[str | Path]) -> ExamReport:
        """The report of one exam given as a folder or as its image files."""
        return self.report_views(self.load_views(exam_files(inputs)))

    def load_datasets(self, datasets: Sequence[Any]) -> ExamViews:
        """Preprocess in-memory DICOM datasets (``ViewLoader.load_datasets``)."""
        return self.views.load_datasets(datasets)

    def report_datasets(self, datasets: Sequence[Any]) -> ExamReport:
        """The report of one exam given as in-memory DICOM datasets (``pydicom.Dataset``)."""
        return self.report_views(self.load_datasets(datasets))


def add_example(bundle: str | Path, inputs: Sequence[str | Path]) -> ExamReport:
    """Report on one exam with the bundle itself and put the report into its model card (which
    thereby also shows that the bundle loads and reports)."""
    bundle = Path(bundle)
    report = ExamReporter.load(bundle).report_files(inputs)
    structured = json.dumps(report.structured.to_json(), indent=1)
    card = (bundle / "README.md").read_text(encoding="utf-8")
    card += (
        f"\n## Example\n\nA held-out exam reported by this bundle ({report.seconds:.2f} s on the machine "
        f"that exported it; views {', '.join(report.views)}):\n\n```\n{report.text}\n```\n\nParsed:\n\n"
        f"```json\n{structured}\n```\n"
    )
    write_text_atomic(bundle / "README.md", card)
    rehash(bundle)
    return report
