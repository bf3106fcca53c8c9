"""Adapters, audit, preprocessing cache and bad input."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from evaluation.parser import parse_report
from mammorg.data.audit import audit_manifest
from mammorg.data.ingest import ingest
from mammorg.io import MammorgError, read_jsonl
from mammorg.preprocess import PreprocessSpec, load_cached, preprocess_manifest


def test_vindr_ingest_of_synthetic_data_matches_truth(synth_dir, tmp_path):
    out = tmp_path / "m.jsonl"
    result = ingest("vindr", synth_dir, out, parse_report)
    assert not result.problems
    truth = {r["exam_id"].split("-", 1)[1]: r for r in read_jsonl(synth_dir / "manifest.jsonl")}
    rows = read_jsonl(out)
    assert len(rows) == 8
    for row in rows:
        gold = truth[row["exam_id"].split("-", 1)[1]]
        assert row["labels"]["density"] == gold["labels"]["density"]
        assert row["labels"]["birads"] == gold["labels"]["birads"]
        for side in "LR":
            pos = {f for f, s in gold["labels"]["findings"][side].items() if s == "pos"}
            got = {f for f, s in row["labels"]["findings"][side].items() if s == "pos"}
            if not any(x.get("quadrant") == "axillary tail" for x in gold["meta"]["lesions"][side]):
                assert got == pos
        assert row["report"] == gold["report"]
        assert all((out.parent / p).exists() for p in row["views"].values())


def _copy_synth(synth_dir, tmp_path):
    root = tmp_path / "vindr"
    shutil.copytree(synth_dir, root)
    return root


def test_bad_exam_does_not_stop_ingest_and_is_audited(synth_dir, tmp_path):
    root = _copy_synth(synth_dir, tmp_path)
    with open(root / "breast-level_annotations.csv") as fh:
        rows = list(csv.DictReader(fh))
    first = rows[0]
    (root / "images" / first["study_id"] / f"{first['image_id']}.dicom").unlink()
    rows.append(dict(rows[1]))  # duplicate view
    with open(root / "breast-level_annotations.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "m.jsonl"
    result = ingest("vindr", root, out, parse_report)
    assert len(result.exams) == 8
    messages = " ".join(p.problem for p in result.problems)
    assert "image file missing" in messages and "duplicate view" in messages
    summary = audit_manifest(out)
    assert summary["missing_views"][f"{first['laterality']}_{first['view_position']}"] >= 1
    assert len(summary["problems"]) == len(result.problems)


def test_missing_csv_column_is_a_clear_error(synth_dir, tmp_path):
    root = _copy_synth(synth_dir, tmp_path)
    text = (root / "breast-level_annotations.csv").read_text().replace("breast_density", "dens")
    (root / "breast-level_annotations.csv").write_text(text)
    with pytest.raises(MammorgError, match="missing column.*breast_density"):
        ingest("vindr", root, tmp_path / "m.jsonl", parse_report)
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mammorg",
            "data",
            "ingest",
            "--format",
            "vindr",
            "--root",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "m.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a folder" in proc.stderr


def _folder_fixture(synth_dir, tmp_path):
    src = read_jsonl(synth_dir / "manifest.jsonl")
    root = tmp_path / "folder"
    for i, row in enumerate(src[:3]):
        exam = root / f"exam{i}"
        exam.mkdir(parents=True)
        for view, rel in row["views"].items():
            shutil.copy(synth_dir / rel, exam / f"{view.lower()}.dcm")
        (exam / "report.txt").write_text(row["report"])
    return root, src


def test_folder_adapter_reads_views_from_tags_and_reports(synth_dir, tmp_path):
    root, src = _folder_fixture(synth_dir, tmp_path)
    (root / "exam2" / "report.txt").write_bytes(b"BI-RADS 2 \xff\xfe caf\xe9")
    shutil.copy(root / "exam1" / "l_cc.dcm", root / "exam1" / "zz_dup.dcm")
    (root / "exam0" / "r_mlo.dcm").write_bytes(b"corrupt")
    result = ingest("folder", root, tmp_path / "f.jsonl", parse_report)
    assert len(result.exams) == 3
    by_views = {len([v for v in e.views.values() if v]) for e in result.exams}
    assert by_views == {3, 4}
    assert result.exams[1].labels.density == src[1]["labels"]["density"]
    msgs = " | ".join(p.problem for p in result.problems)
    assert "duplicate view" in msgs and "not a readable DICOM" in msgs and "cp1252" in msgs


def test_dmid_adapter(synth_dir, tmp_path):
    src = read_jsonl(synth_dir / "manifest.jsonl")[0]
    root = tmp_path / "dmid"
    (root / "DICOM_Images").mkdir(parents=True)
    (root / "Reports").mkdir()
    shutil.copy(synth_dir / src["views"]["R_MLO"], root / "DICOM_Images" / "IMG001.dcm")
    (root / "Reports" / "Img001.txt").write_text(
        "Breast Composition: Heterogeneously dense (ACR C)\nBIRADS: 4\n"
        "Findings: An irregular soft opacity with spiculated margins is seen in upper outer quadrant."
    )
    (root / "metadata.csv").write_text("Image,View,Density,Class\nIMG001,MLORT,C,CIRC\nIMG002,XX,B,N\n")
    result = ingest("dmid", root, tmp_path / "d.jsonl", parse_report)
    assert len(result.exams) == 1
    exam = result.exams[0]
    assert exam.views["R_MLO"] and exam.labels.density == "c"
    assert exam.labels.birads["R"] == "4" and exam.labels.findings["R"]["mass"] == "pos"
    assert any("unknown view code" in p.problem for p in result.problems)


def test_cbis_adapter_groups_rows_and_handles_quirks(synth_dir, tmp_path):
    src = read_jsonl(synth_dir / "manifest.jsonl")[0]
    root = tmp_path / "cbis"
    (root / "Mass-Training_P_00001_LEFT_CC").mkdir(parents=True)
    (root / "Calc-Training_P_00001_LEFT_MLO").mkdir(parents=True)
    shutil.copy(synth_dir / src["views"]["L_CC"], root / "Mass-Training_P_00001_LEFT_CC" / "1.dcm")
    shutil.copy(synth_dir / src["views"]["L_MLO"], root / "Calc-Training_P_00001_LEFT_MLO" / "1.dcm")
    (root / "mass_case_description_train_set.csv").write_text(
        "patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
        "mass shape,mass margins,assessment,pathology,subtlety,image file path\n"
        "P_00001,3,LEFT,CC,1,mass,IRREGULAR,ILL_DEFINED-SPICULATED,5,MALIGNANT,4,"
        '"Mass-Training_P_00001_LEFT_CC/1.dcm\n"\n'
    )
    (root / "calc_case_description_train_set.csv").write_text(
        "patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
        "calc type,calc distribution,assessment,pathology,subtlety,image file path\n"
        "P_00001,3,LEFT,MLO,1,calcification,PLEOMORPHIC,CLUSTERED,4,BENIGN,3,"
        "Calc-Training_P_00001_LEFT_MLO/1.dcm\n"
    )
    result = ingest("cbis-ddsm", root, tmp_path / "c.jsonl", parse_report)
    assert not result.problems, result.problems
    (exam,) = result.exams
    assert exam.labels.density == "c" and exam.labels.birads["L"] == "5"
    assert exam.labels.findings["L"] == {"mass": "pos", "calcification": "pos"}
    assert exam.views["L_CC"] and exam.views["L_MLO"] and exam.views["R_CC"] is None
    assert exam.meta["lesions"][0]["margin"] == ["ill defined", "spiculated"]


def test_preprocess_cache_skips_done_and_records_bad(synth_dir, tmp_path):
    root = _copy_synth(synth_dir, tmp_path)
    manifest = tmp_path / "m.jsonl"
    ingest("vindr", root, manifest, parse_report)
    first = read_jsonl(manifest)[0]
    bad = manifest.parent / first["views"]["R_CC"]
    bad.write_bytes(bad.read_bytes()[:400])
    spec = PreprocessSpec(height=64, width=32)
    s1 = preprocess_manifest(manifest, tmp_path / "cache", spec, workers=2, progress=False)
    assert s1["decoded"] == 31 and len(s1["problems"]) == 1
    s2 = preprocess_manifest(manifest, tmp_path / "cache", spec, workers=1, progress=False)
    assert s2["decoded"] == 0 and s2["reused"] == 31
    rows = read_jsonl(tmp_path / "cache" / "manifest.jsonl")
    arr = load_cached(tmp_path / "cache", rows[1]["cache"]["L_CC"])
    assert arr.shape == (64, 32) and arr.dtype == np.uint16 and arr.max() > 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # orientation: both breasts face the same way (chest wall left) after preprocessing
    for view in ("L_CC", "R_CC"):
        a = load_cached(tmp_path / "cache", rows[1]["cache"][view]).astype(float)
        assert a[:, :16].sum() > a[:, 16:].sum()


def test_descriptors_are_canonicalised():
    from mammorg.data.cbis import side_descriptors
    from mammorg.labels import canonical_descriptor

    assert canonical_descriptor("mass_margin", "SPICULATED") == "spiculated"
    assert canonical_descriptor("calc_morphology", "PLEOMORPHIC") == "fine pleomorphic"
    assert canonical_descriptor("calc_morphology", "fine_linear_branching") == "fine linear branching"
    assert canonical_descriptor("calc_distribution", "scattered") == "diffuse"
    assert canonical_descriptor("mass_shape", "ARCHITECTURAL_DISTORTION") is None
    lesions = [
        {
            "side": "R",
            "shape": ["irregular"],
            "margin": ["ill defined"],
            "morphology": [],
            "distribution": [],
        },
        {
            "side": "L",
            "shape": [],
            "margin": [],
            "morphology": ["punctate", "pleomorphic"],
            "distribution": ["clustered"],
        },
    ]
    assert side_descriptors(lesions) == {
        "R": {"mass_shape": "irregular", "mass_margin": "indistinct"},
        "L": {"calc_morphology": "fine pleomorphic", "calc_distribution": "grouped"},
    }


def test_cache_manifest_views_resolve_from_its_own_folder(synth_dir, tmp_path, monkeypatch):
    """Relative paths given on the command line: the cache manifest's view paths are relative to
    the cache folder, so they resolve wherever the manifest is read from."""
    root = _copy_synth(synth_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    ingest("vindr", root.name, "m.jsonl", parse_report)
    preprocess_manifest("m.jsonl", "cache", PreprocessSpec(height=64, width=32), workers=1, progress=False)
    from mammorg.schema import read_manifest

    for exam in read_manifest(tmp_path / "cache" / "manifest.jsonl"):
        assert all(exam.view_path(v, tmp_path / "cache").is_file() for v in exam.present_views)
