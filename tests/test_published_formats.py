"""The public data sets exactly as published: one test per quirk of issue #18.

Fixtures are made at test time: the CSV/spreadsheet layouts of CBIS-DDSM, DMID and VinDr-Mammo
with tiny DICOMs at the paths they name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from evaluation.parser import parse_report
from mammorg.data.cbis import mass_row_findings
from mammorg.data.dmid import abnormality_finding, read_metadata, view_of
from mammorg.data.ingest import ingest
from mammorg.dicom import DicomViewError, read_dicom
from mammorg.io import MammorgError, read_jsonl
from mammorg.synth.writer import dicom_dataset


def _dicom(path: Path, view: str = "L_CC", pixels: np.ndarray | None = None) -> Path:
    """A tiny MG DICOM (for presentation) at ``path``."""
    if pixels is None:
        pixels = np.linspace(0, 1, 32 * 16).reshape(32, 16)
    uid = pydicom.uid.generate_uid()
    ids = {
        "sop_uid": uid,
        "study_uid": pydicom.uid.generate_uid(),
        "series_uid": pydicom.uid.generate_uid(),
        "patient_name": "Doe^Jane",
        "patient_id": "P123",
        "birth_date": "19600101",
        "accession": "A1",
        "monochrome1_fraction": 0.0,
    }
    ds = dicom_dataset(pixels.astype(float), view, ids, np.random.default_rng(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _binary(path: Path, shape: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    """An ROI mask: 0 outside, 1 inside (x0, y0, x1, y1)."""
    arr = np.zeros(shape)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 1.0
    return _dicom(path, "L_CC", arr)


# ---------------------------------------------------------------- CBIS-DDSM

MASS_HEADER = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,"
    "mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path"
)
CALC_HEADER = (
    "patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,calc type,"
    "calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path"
)
UID_A = "1.3.6.1.4.1.9590.100.1.2.422112722213189649807611434612228974994"
UID_B = "1.3.6.1.4.1.9590.100.1.2.342386194811267636608694132590482924515"


def _cbis(root: Path) -> Path:
    # P_00001 LEFT CC: UID layout, exactly the CSV's path; mask in the "cropped" column (mass files)
    folder = "Mass-Training_P_00001_LEFT_CC"
    _dicom(root / folder / UID_A / UID_B / "000000.dcm", "L_CC")
    roi = "Mass-Training_P_00001_LEFT_CC_1"
    _binary(root / roi / UID_A / "111" / "000000.dcm", (32, 16), (3, 4, 9, 12))
    _dicom(root / roi / UID_A / "111" / "000001.dcm", "L_CC", np.random.default_rng(1).random((8, 6)))
    # P_00002 RIGHT MLO: descriptive layout (dates, series descriptions) under the same leading folder
    folder2 = "Mass-Training_P_00002_RIGHT_MLO"
    _dicom(root / folder2 / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm", "R_MLO")
    mass_rows = [
        f"P_00001,3,LEFT,CC,1,mass,IRREGULAR-ARCHITECTURAL_DISTORTION,SPICULATED,5,MALIGNANT,4,"
        f'"{folder}/{UID_A}/{UID_B}/000000.dcm\n",{roi}/{UID_A}/111/000000.dcm,{roi}/{UID_A}/111/000001.dcm',
        f"P_00002,2,RIGHT,MLO,1,mass,LYMPH_NODE,CIRCUMSCRIBED,2,BENIGN_WITHOUT_CALLBACK,0,"
        f"{folder2}/{UID_A}/{UID_B}/000000.dcm,,",
    ]
    (root / "mass_case_description_train_set.csv").write_bytes(
        ("\r\n".join([MASS_HEADER, *mass_rows]) + "\r\n").encode()
    )
    # calc test file: density 0, N/A descriptors, assessment 0, subtlety 0
    folder3 = "Calc-Test_P_00003_LEFT_MLO"
    _dicom(root / folder3 / UID_A / UID_B / "000000.dcm", "L_MLO")
    calc_rows = [f"P_00003,0,LEFT,MLO,1,calcification,N/A,N/A,0,MALIGNANT,0,{folder3}/{UID_A}/{UID_B}/000000.dcm,,"]
    (root / "calc_case_description_test_set.csv").write_bytes(
        ("\r\n".join([CALC_HEADER, *calc_rows]) + "\r\n").encode()
    )
    return root


@pytest.fixture(scope="module")
def cbis(tmp_path_factory):
    root = _cbis(tmp_path_factory.mktemp("cbis"))
    out = root / "manifest.jsonl"
    return ingest("cbis-ddsm", root, out, parse_report), out


def _exam(result, predicate):
    (exam,) = [e for e in result.exams if predicate(e)]
    return exam


def test_cbis_crlf_quoted_newline_and_uid_layout(cbis):
    result, _ = cbis
    assert not result.problems, result.problems
    exam = _exam(result, lambda e: e.views.get("L_CC"))
    assert exam.views["L_CC"].endswith("000000.dcm") and exam.labels.density == "c"


def test_cbis_mass_shape_names_other_findings(cbis):
    result, _ = cbis
    exam = _exam(result, lambda e: e.views.get("L_CC"))
    assert exam.labels.findings["L"]["mass"] == "pos"
    assert exam.labels.findings["L"]["architectural_distortion"] == "pos"
    node = _exam(result, lambda e: e.views.get("R_MLO"))
    assert node.labels.findings["R"].get("lymph_node") == "pos" and node.labels.findings["R"].get("mass") != "pos"
    assert mass_row_findings("ASYMMETRIC_BREAST_TISSUE") == ["asymmetry"]
    assert mass_row_findings("FOCAL_ASYMMETRIC_DENSITY") == ["asymmetry"]
    assert mass_row_findings("N/A") == ["mass"]


def test_cbis_descriptive_layout_resolves(cbis):
    result, _ = cbis
    node = _exam(result, lambda e: e.views.get("R_MLO"))
    assert "full mammogram images-24515" in node.views["R_MLO"]


def test_cbis_calc_test_file_zeros_and_na(cbis):
    result, _ = cbis
    exam = _exam(result, lambda e: e.views.get("L_MLO"))
    assert exam.labels.density is None  # density 0: unknown
    assert exam.labels.birads["L"] == "0"  # assessment 0 is BI-RADS 0
    assert exam.labels.findings["L"]["calcification"] == "pos"
    assert exam.meta["lesions"][0]["morphology"] == [] and exam.meta["lesions"][0]["distribution"] == []


def test_cbis_mask_gives_the_lesion_box_whichever_column_holds_it(cbis):
    result, manifest = cbis
    exam = _exam(result, lambda e: e.views.get("L_CC"))
    boxes = [lesion.box.to_json() for lesion in exam.lesions if lesion.box is not None]
    assert boxes and boxes[0] == [3.0, 4.0, 9.0, 12.0]
    written = [row for row in read_jsonl(manifest) if row["views"].get("L_CC")]
    assert written[0]["lesions"][0]["box"] == [3.0, 4.0, 9.0, 12.0]


# ---------------------------------------------------------------- DMID


def _dmid(root: Path, spreadsheet: bool = True) -> Path:
    legend = [
        ["Digital mammography dataset for breast cancer diagnosis research", None, None, None, None],
        ["Column 2: view (CCLT, CCRT, MLOLT, MLORT)", None, None, None, None],
        [None, None, None, None, None],
    ]
    data = [
        ["IMG001", "MLORT", "G", "CIRC", "M"],
        ["IMG002", "CC LT", "D", "CALCS", "B"],  # view code with a space, misspelt class
        ["IMG003", "MLOLT", "F", "ASSYM", "B"],  # misspelt class, TIFF image, no report
        ["IMG004", "XXLT", "F", "NORM", None],  # unknown view
    ]
    frame = pd.DataFrame(legend + data)
    if spreadsheet:
        frame.to_excel(root / "Metadata.xlsx", header=False, index=False)
    else:
        frame.to_csv(root / "Metadata.csv", header=False, index=False)
    _dicom(root / "DICOM_Images" / "IMG001.dcm", "R_MLO")
    _dicom(root / "DICOM_Images" / "IMG002.dcm", "L_CC")
    tiff = root / "TIFF_Images"
    tiff.mkdir(parents=True)
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((32, 16)) * 65535).astype(np.uint16)).save(tiff / "IMG003.tif")
    reports = root / "Reports"
    reports.mkdir()
    (reports / "Img001.txt").write_bytes(
        b"\r\nBREAST COMPOSITION:\r\nfibro fatty and glandular breast parenchyma (ACR-B)\r\n\r\nBIRADS: 3, 4b\r\n\r\n"
        b"FINDINGS:\r\nill-defined opacity seen in the upper quadrant.\r\nfew enlarged axillary nodes seen.\r\n"
    )
    (reports / "Img002.txt").write_bytes(
        b"BREAST COMPOSITION:\r\ndense glandular breast parenchyma (ACR C)\r\n\r\nBIRADS: 2\r\n\r\n"
        b"FINDINGS:\r\nbenign-looking calcifications.\r\nNo abnormal soft opacity.\r\n"
    )
    return root


@pytest.mark.parametrize("spreadsheet", [True, False])
def test_dmid_as_published(tmp_path, spreadsheet):
    root = _dmid(tmp_path, spreadsheet)
    result = ingest("dmid", root, tmp_path / "m.jsonl", parse_report)
    by_view = {next(v for v, p in e.views.items() if p): e for e in result.exams}
    assert set(by_view) == {"R_MLO", "L_CC", "L_MLO"}
    first = by_view["R_MLO"]  # CRLF report, "(ACR-B)", "3, 4b": the most severe, to the image's side
    assert first.labels.density == "b" and first.labels.birads["R"] == "4B"
    assert first.labels.findings["R"]["mass"] == "pos" and first.labels.findings["R"]["lymph_node"] == "pos"
    second = by_view["L_CC"]
    assert second.labels.density == "c" and second.labels.findings["L"]["calcification"] == "pos"
    assert second.labels.findings["L"]["mass"] == "neg"
    third = by_view["L_MLO"]  # TIFF, no report: the metadata class (misspelt ASSYM) and tissue
    assert third.views["L_MLO"].endswith("IMG003.tif") and third.labels.findings["L"]["asymmetry"] == "pos"
    assert third.labels.density == "a"
    assert [p.problem for p in result.problems] == ["image IMG004: unknown view code 'XXLT'"]


def test_dmid_codes():
    assert view_of("CC LT") == "L_CC" and view_of("MLORT") == "R_MLO" and view_of("mlo-lt") == "L_MLO"
    assert abnormality_finding("SPIC") == ("mass", True)
    assert abnormality_finding("CALCS") == ("calcification", True)
    assert abnormality_finding("ARCHI") == ("architectural_distortion", True)
    assert abnormality_finding("QQQQ") == (None, False)


def test_dmid_metadata_without_image_rows_is_one_line_error(tmp_path):
    path = tmp_path / "Metadata.csv"
    path.write_text("legend only\nnothing else\n")
    with pytest.raises(MammorgError, match="Metadata.csv: no DMID image rows"):
        read_metadata(path)


# ---------------------------------------------------------------- VinDr-Mammo

BREAST_CSV = "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,split"
FINDING_CSV = (
    "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,"
    "finding_categories,finding_birads,xmin,ymin,xmax,ymax,split"
)


def _vindr(root: Path) -> Path:
    images = [
        ("s1", "i1", "L", "CC", "BI-RADS 4", "DENSITY B"),
        ("s1", "i2", "L", "MLO", "BI-RADS 4", "DENSITY B"),
        ("s1", "i3", "R", "CC", "BI-RADS 1", "DENSITY C"),  # the denser breast
        ("s1", "i4", "R", "CC", "BI-RADS 1", "DENSITY C"),  # two R_CC images, no R_MLO
    ]
    rows = [f"{s},ser,{i},{lat},{v},32,16,{b},{d},training" for s, i, lat, v, b, d in images]
    (root / "breast-level_annotations.csv").write_text("\n".join([BREAST_CSV, *rows]) + "\n")
    findings = [
        "s1,ser,i1,L,CC,32,16,BI-RADS 4,DENSITY B,\"['Mass', 'Skin Retraction']\",BI-RADS 4,-3.5,2,10,20,training",
        "s1,ser,i2,L,MLO,32,16,BI-RADS 4,DENSITY B,\"['Suspicious Lymph Node']\",BI-RADS 4,1,1,5,5,training",
        "s1,ser,i2,L,MLO,32,16,BI-RADS 4,DENSITY B,\"['Global Asymmetry']\",BI-RADS 3,,,,,training",
        "s1,ser,i3,R,CC,32,16,BI-RADS 1,DENSITY C,\"['No Finding']\",,,,,,training",
    ]
    (root / "finding_annotations.csv").write_text("\n".join([FINDING_CSV, *findings]) + "\n")
    for s, i, lat, v, *_ in images:
        _dicom(root / "images" / s / f"{i}.dicom", f"{lat}_{v}")
    return root


@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    root = _vindr(tmp_path_factory.mktemp("vindr"))
    out = root / "manifest.jsonl"
    return ingest("vindr", root, out, parse_report), out


def test_vindr_list_strings_and_categories(vindr):
    result, _ = vindr
    (exam,) = result.exams
    left = exam.labels.findings["L"]
    assert left["mass"] == left["lymph_node"] == left["asymmetry"] == "pos"
    assert left["calcification"] == "neg" and left["skin_thickening"] == "neg"  # Skin Retraction: outside
    assert all(v == "neg" for v in exam.labels.findings["R"].values())


def test_vindr_density_is_the_denser_breast_and_birads_per_breast(vindr):
    result, _ = vindr
    (exam,) = result.exams
    assert exam.labels.density == "c" and exam.labels.birads == {"L": "4", "R": "1", "exam": "4"}


def test_vindr_duplicate_and_missing_view(vindr):
    result, _ = vindr
    (exam,) = result.exams
    assert exam.views["R_CC"].endswith("i3.dicom") and exam.views["R_MLO"] is None
    assert any("duplicate view R_CC" in p.problem for p in result.problems)


def test_vindr_boxes_reach_the_manifest_clipped(vindr):
    _, manifest = vindr
    (row,) = read_jsonl(manifest)
    boxes = {(les["view"], les["finding"]): les.get("box") for les in row["lesions"]}
    assert boxes[("L_CC", "mass")] == [0.0, 2.0, 10.0, 20.0]  # negative xmin clipped to the image
    assert boxes[("L_MLO", "lymph_node")] == [1.0, 1.0, 5.0, 5.0]
    assert ("L_CC", "skin_thickening") not in boxes
    assert "s1" not in json.dumps(row["exam_id"])  # identifiers hashed


# ---------------------------------------------------------------- DICOM headers


def _ds(tmp_path, name="x.dcm", **tags) -> Path:
    path = _dicom(tmp_path / name, "L_CC")
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


def test_laterality_only_in_0020_0060(tmp_path):
    path = _ds(tmp_path, ImageLaterality=None, Laterality="R")
    assert read_dicom(path).view == "R_CC"


def test_view_only_in_view_code_sequence(tmp_path):
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399368009", "SCT", "medio-lateral oblique"
    path = _ds(tmp_path, ViewPosition=None, ViewCodeSequence=Sequence([code]))
    assert read_dicom(path).view == "L_MLO"


def test_dx_with_body_part_breast_is_accepted_ct_refused(tmp_path):
    ok = _ds(tmp_path, "dx.dcm", Modality="DX", BodyPartExamined="BREAST")
    assert read_dicom(ok).pixels.size
    bad = _ds(tmp_path, "ct.dcm", Modality="CT", BodyPartExamined="CHEST")
    with pytest.raises(MammorgError, match=r"ct\.dcm: .*CT"):
        read_dicom(bad)


def test_jpeg_extended_12_bit_undecodable_is_one_line(tmp_path):
    path = _ds(tmp_path, "jpeg.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.51"  # JPEG Extended (Process 2 & 4)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xc1" + b"\x00" * 64 + b"\xff\xd9"])
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    with pytest.raises(MammorgError) as err:
        read_dicom(path)
    message = str(err.value)
    assert "jpeg.dcm" in message and "jpeg extended" in message.lower() and "\n" not in message
    assert "no installed decoder" in message


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "RGB"])
def test_colour_images_are_refused_by_name(tmp_path, photometric):
    path = _ds(tmp_path, PhotometricInterpretation=photometric)
    with pytest.raises((MammorgError, DicomViewError)) as err:
        read_dicom(path)
    assert photometric in str(err.value) and "x.dcm" in str(err.value)


# ---------------------------------------------------------------- templated reports


@pytest.mark.parametrize("fixture", ["vindr", "cbis"])
def test_templated_reports_state_the_labels(fixture, request, tmp_path):
    """`mammorg data reports`: every style's report, read back by the parser, states the
    exam's density, BI-RADS and positive findings per side; view paths still resolve."""
    from mammorg.data.audit import audit_manifest
    from mammorg.data.templated import TEMPLATE_STYLES, write_templated_manifest
    from mammorg.schema import read_manifest

    _, manifest = request.getfixturevalue(fixture)
    for style in TEMPLATE_STYLES:
        out = tmp_path / style / "with_reports.jsonl"
        summary = write_templated_manifest(manifest, out, [style])
        assert summary.written == len(read_manifest(manifest)) and summary.styles == {style: summary.written}
        for exam in read_manifest(out):
            assert exam.report_origin == "templated" and exam.meta["report_style"] == style
            assert all(exam.view_path(v, out.parent).is_file() for v in exam.present_views)
            parsed = parse_report(exam.report)
            assert parsed.density == exam.labels.density
            assert parsed.birads["exam"] == exam.labels.birads["exam"]
            for side in ("L", "R"):
                want = {f for f, v in exam.labels.findings[side].items() if v == "pos"}
                got = {f for f, v in parsed.findings[side].items() if v == "pos"}
                assert got == want, (style, side, exam.report)
                if fixture == "cbis" and not want:  # not exhaustively annotated: nothing said
                    assert not parsed.findings[side]
        assert audit_manifest(out)["templated_reports"] == summary.written


def test_templated_reports_cli_refuses_unknown_style_and_same_file(vindr, tmp_path):
    import subprocess
    import sys

    _, manifest = vindr
    for extra in (["--out", str(tmp_path / "x.jsonl"), "--styles", "haiku"], ["--out", str(manifest)]):
        proc = subprocess.run(
            [sys.executable, "-m", "mammorg", "data", "reports", "--manifest", str(manifest), *extra],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
