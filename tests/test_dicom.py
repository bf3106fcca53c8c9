"""DICOM reader: transfer syntaxes, photometric handling, view/laterality, bad input."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mammorg.dicom import DicomViewError, read_dicom, view_of
from mammorg.io import MammorgError
from mammorg.synth.writer import dicom_dataset

LOSSLESS_VARIANTS = [
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_expb.dcm",
]


def _local(name):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not shipped")
    return path


def _as_mammo(src, dst, side="L", view="CC"):
    ds = pydicom.dcmread(src)
    ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", side, view
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize("name", LOSSLESS_VARIANTS)
def test_lossless_transfer_syntaxes_decode_identically(tmp_path, name):
    ref = read_dicom(_as_mammo(_local("MR_small.dcm"), tmp_path / "ref.dcm")).pixels
    img = read_dicom(_as_mammo(_local(name), tmp_path / "x.dcm"))
    assert img.view == "L_CC"
    assert img.pixels.dtype == np.float32 and img.pixels.shape == ref.shape
    np.testing.assert_allclose(img.pixels, ref, atol=1e-6)


def test_jpeg2000_lossy_decodes(tmp_path):
    img = read_dicom(_as_mammo(_local("JPEG2000.dcm"), tmp_path / "j2k.dcm", "R", "MLO"))
    assert img.view == "R_MLO" and img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0
    assert img.pixels.std() > 0.01


def test_jpeg_lossless_process14_decodes(tmp_path):
    """JPEG Lossless (1.2.840.10008.1.2.4.70) via pylibjpeg-libjpeg, on any shipped sample."""
    import glob
    import os

    folder = os.path.dirname(_local("MR_small.dcm"))
    for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if (
            str(getattr(ds.file_meta, "TransferSyntaxUID", "")) == "1.2.840.10008.1.2.4.70"
            and ds.get("SamplesPerPixel", 1) == 1
            and "PixelData" in ds
        ):
            img = read_dicom(_as_mammo(path, tmp_path / "jll.dcm"))
            assert img.pixels.std() > 0
            return
    pytest.skip("no single-channel JPEG Lossless sample shipped with pydicom")


def _mg(pixels, monochrome1, tmp_path, name="mg.dcm", **tags):
    rng = np.random.default_rng(0)
    ids = {
        "sop_uid": "1.2.3.4",
        "study_uid": "1.2.3",
        "series_uid": "1.2.3.5",
        "patient_name": "X",
        "patient_id": "Y",
        "birth_date": "19700101",
        "accession": "Z",
        "monochrome1_fraction": 1.0 if monochrome1 else 0.0,
    }
    ds = dicom_dataset(pixels, "R_MLO", ids, rng)
    ds.VOILUTFunction = "LINEAR"
    ds.WindowCenter, ds.WindowWidth = 2 ** (ds.BitsStored - 1), 2**ds.BitsStored
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_and_2_give_same_bright_dense_image(tmp_path):
    pixels = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
    a = read_dicom(_mg(pixels, False, tmp_path, "m2.dcm")).pixels
    b = read_dicom(_mg(pixels, True, tmp_path, "m1.dcm")).pixels
    np.testing.assert_allclose(a, b, atol=2e-3)
    np.testing.assert_allclose(a, pixels, atol=2e-3)
    ds = pydicom.dcmread(tmp_path / "m1.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.pixel_array[0, 0] > ds.pixel_array[-1, -1]  # stored inverted


def test_sigmoid_voi_and_padding(tmp_path):
    pixels = np.full((32, 16), 0.5, dtype=np.float32)
    pixels[:, :4] = 0.0
    path = _mg(pixels, False, tmp_path, VOILUTFunction="SIGMOID", PixelPaddingValue=0)
    img = read_dicom(path).pixels
    assert np.all(img[:, :4] == 0.0) and abs(float(img[0, 8]) - 0.5) < 0.05


def test_view_fallbacks():
    ds = Dataset()
    ds.Laterality = "R"
    code = Dataset()
    code.CodeValue, code.CodeMeaning = "R-10226", "medio-lateral oblique"
    ds.ViewCodeSequence = [code]
    assert view_of(ds) == "R_MLO"
    ds.ImageLaterality = "L"  # Image Laterality wins over Laterality
    assert view_of(ds) == "L_MLO"
    ds2 = Dataset()
    ds2.ImageLaterality, ds2.ViewPosition = "L", "XCCL"
    assert view_of(ds2) == "L_CC"


def test_unknown_view_is_an_error_not_a_guess(tmp_path):
    path = _mg(np.zeros((8, 8), np.float32), False, tmp_path, ImageLaterality=None, ViewCodeSequence=None)
    with pytest.raises(DicomViewError, match="laterality unknown"):
        read_dicom(path)


def test_for_processing_is_skipped(tmp_path):
    path = _mg(np.zeros((8, 8), np.float32), False, tmp_path, PresentationIntentType="FOR PROCESSING")
    with pytest.raises(MammorgError, match="FOR PROCESSING"):
        read_dicom(path)
    assert read_dicom(path, allow_for_processing=True).view == "R_MLO"


def test_truncated_and_missing_pixels(tmp_path):
    path = _mg(np.random.rand(64, 32).astype(np.float32), False, tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "trunc.dcm"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MammorgError, match="trunc.dcm"):
        read_dicom(bad)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(MammorgError, match="no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom at all")
    with pytest.raises(MammorgError, match="junk.dcm"):
        read_dicom(tmp_path / "junk.dcm")
