"""Narrative reports for label-only data sets (VinDr-Mammo, CBIS-DDSM), written from their labels.

The writer is the synthetic generator's (``mammorg.synth.reports``), in its report styles, fed
only what the labels know: density, BI-RADS per breast, positive findings with their
descriptors. Nothing is invented: no size, no location. A breast without positive findings is
called normal only where the data set annotates exhaustively (its findings are ``neg``, as in
VinDr-Mammo); otherwise it is left out. Each report is marked ``meta.report_origin:
"templated"`` with its style, so training and evaluation can tell it from a radiologist's text
(the prompt-template idea of MMG-CLIP).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mammorg.io import MammorgError, write_jsonl_atomic
from mammorg.labels import SIDES
from mammorg.schema import Exam, read_manifest
from mammorg.synth.reports import NEGATIVE_SET, REPORT_STYLES, write_report

TEMPLATE_STYLES = ("us_screening", "per_breast", "free_text")  # styles that state laterality
_DESCRIPTOR_KEYS = {
    "mass": {"mass_shape": "shape", "mass_margin": "margin"},
    "calcification": {"calc_morphology": "morphology", "calc_distribution": "distribution"},
}
_ORDER = ("mass", "calcification", "architectural_distortion", "asymmetry", "lymph_node")
_ASSOCIATED = ("skin_thickening", "nipple_retraction")


def writer_input(exam: Exam) -> dict | None:
    """The generator's exam record from what the labels know; None when the exam has no
    BI-RADS category (a report without an assessment is not written)."""
    labels = exam.labels
    if not labels.birads.get("exam"):
        return None
    breasts = {}
    for side in SIDES:
        states = labels.findings.get(side) or {}
        positive = [f for f in (*_ORDER, *_ASSOCIATED) if states.get(f) == "pos"]
        descriptors = (labels.descriptors or {}).get(side) or {}
        lesions = []
        for finding in positive:
            lesion: dict = {"type": finding}
            for name, key in _DESCRIPTOR_KEYS.get(finding, {}).items():
                if descriptors.get(name):
                    lesion[key] = descriptors[name]
            lesions.append(lesion)
        normal = not positive and all(states.get(f) == "neg" for f in NEGATIVE_SET)
        breasts[side] = {"lesions": lesions, "birads": labels.birads.get(side), "normal": normal}
    return {"density": labels.density, "exam_birads": labels.birads["exam"], "breasts": breasts}


def templated_report(exam: Exam, styles: Sequence[str], seed: int = 0) -> tuple[str, str] | None:
    """(text, style) for one exam; the style and wording are drawn from a seed of the exam id,
    so a rerun writes the same report."""
    record = writer_input(exam)
    if record is None:
        return None
    digest = hashlib.sha256(f"{seed}:{exam.exam_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    style = str(rng.choice(list(styles)))
    return write_report(record, style, rng), style


@dataclass
class TemplatedSummary:
    written: int = 0
    kept_original: int = 0
    skipped: list[dict] = field(default_factory=list)
    styles: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "written": self.written,
            "kept_original": self.kept_original,
            "skipped": self.skipped,
            "styles": self.styles,
        }


def _rebase(exam: Exam, source_dir: Path, out_dir: Path) -> None:
    """View paths stay right when the new manifest lives in another folder."""
    if source_dir.resolve() == out_dir.resolve():
        return
    for view, value in exam.views.items():
        if value and not Path(value).is_absolute():
            exam.views[view] = os.path.relpath(source_dir / value, out_dir)


def write_templated_manifest(
    manifest: str | Path, out: str | Path, styles: Sequence[str] = TEMPLATE_STYLES, seed: int = 0, replace: bool = False
) -> TemplatedSummary:
    """Copy ``manifest`` to ``out`` with a templated report for each exam that has none (or for
    every exam with ``replace``)."""
    unknown = [s for s in styles if s not in REPORT_STYLES]
    if unknown or not styles:
        choices = ", ".join(REPORT_STYLES)
        raise MammorgError(f"unknown report style(s) {unknown or '(none given)'}; choose from {choices}")
    manifest, out = Path(manifest), Path(out)
    if manifest.resolve() == out.resolve():
        raise MammorgError(f"{out}: the output must not overwrite the input manifest")
    exams = read_manifest(manifest)
    summary = TemplatedSummary()
    for exam in exams:
        _rebase(exam, manifest.parent, out.parent)
        if exam.report and not replace:
            summary.kept_original += 1
            continue
        made = templated_report(exam, styles, seed)
        if made is None:
            summary.skipped.append({"exam_id": exam.exam_id, "problem": "no BI-RADS category; no report written"})
            continue
        exam.report, style = made
        exam.meta = {**exam.meta, "report_origin": "templated", "report_style": style}
        summary.written += 1
        summary.styles[style] = summary.styles.get(style, 0) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, exams)
    return summary
