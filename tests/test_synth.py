"""Synthetic generator: DICOM tags, labels ↔ report consistency, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom

from evaluation.parser import parse_report
from mammorg.dicom import read_dicom
from mammorg.io import read_jsonl
from mammorg.synth.findings import lesion_birads, sample_exam
from mammorg.synth.writer import SynthSettings, synthesise


def test_dicom_tags_and_privacy(synth_dir):
    rows = read_jsonl(synth_dir / "manifest.jsonl")
    assert len(rows) == 8
    ds = pydicom.dcmread(synth_dir / rows[0]["views"]["L_MLO"])
    assert ds.Modality == "MG" and ds.ImageLaterality == "L" and ds.ViewPosition == "MLO"
    assert ds.BitsStored in (12, 14) and ds.PhotometricInterpretation.startswith("MONOCHROME")
    assert ds.PresentationIntentType == "FOR PRESENTATION" and "WindowCenter" in ds
    assert ds.pixel_array.max() < 2**ds.BitsStored
    text = (synth_dir / "manifest.jsonl").read_text()
    assert ds.PatientID not in text and str(ds.PatientName) not in text
    assert ds.AccessionNumber not in text


def test_images_decode_and_breast_is_visible(synth_dir):
    row = read_jsonl(synth_dir / "manifest.jsonl")[0]
    for view, rel in row["views"].items():
        img = read_dicom(synth_dir / rel)
        assert img.view == view
        assert 0.1 < (img.pixels > 0.05).mean() < 0.95


def test_report_states_the_labels(synth_dir):
    for row in read_jsonl(synth_dir / "manifest.jsonl"):
        parsed = parse_report(row["report"]).to_json()
        labels = row["labels"]
        assert parsed["density"] == labels["density"]
        assert parsed["birads"]["exam"] == labels["birads"]["exam"]
        if row["meta"]["report_style"] != "single_image":
            for side in "LR":
                for finding, state in labels["findings"][side].items():
                    assert parsed["findings"][side].get(finding) == state, (row["report"], side)


def test_birads_rules_follow_domain():
    assert lesion_birads({"type": "mass", "shape": "irregular", "margin": "spiculated"}) == "5"
    assert lesion_birads({"type": "mass", "shape": "oval", "margin": "circumscribed"}) == "3"
    assert lesion_birads({"type": "calcification", "morphology": "fine linear branching"}) == "4C"
    assert lesion_birads({"type": "calcification", "morphology": "fine pleomorphic"}) == "4B"
    rng = np.random.default_rng(0)
    exams = [sample_exam(rng) for _ in range(200)]
    assert {e["exam_birads"] for e in exams} >= {"1", "2", "3", "4B", "5"}


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    s = SynthSettings(exams=2, seed=11, height=64, width=32)
    synthesise(tmp_path / "a", s, progress=False)
    synthesise(tmp_path / "b", s, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    synthesise(tmp_path / "c", SynthSettings(exams=2, seed=12, height=64, width=32), progress=False)
    assert json.loads((tmp_path / "a/manifest.jsonl").read_text().splitlines()[0]) != json.loads(
        (tmp_path / "c/manifest.jsonl").read_text().splitlines()[0]
    )
