"""Reading mammography DICOM: decode, modality/VOI LUT, MONOCHROME1, padding, view and laterality."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from mammorg.io import MammorgError

# View Code Sequence code values (SNOMED RT and SNOMED CT) for the projections we use.
_VIEW_CODES = {
    "R-10242": "CC",
    "399162004": "CC",
    "R-1024A": "CC",
    "399067008": "CC",  # CC, XCCL
    "R-10226": "MLO",
    "399368009": "MLO",
    "R-10224": "MLO",
    "399260004": "MLO",  # MLO, ML
    "R-10230": "MLO",
    "399352003": "MLO",  # LM
}
_VIEW_POSITIONS = {
    "CC": "CC",
    "XCCL": "CC",
    "XCCM": "CC",
    "FB": "CC",
    "MLO": "MLO",
    "ML": "MLO",
    "LM": "MLO",
    "LMO": "MLO",
    "SIO": "MLO",
}
_MEANINGS = (
    ("cranio-caudal", "CC"),
    ("craniocaudal", "CC"),
    ("medio-lateral oblique", "MLO"),
    ("mediolateral oblique", "MLO"),
    ("medio-lateral", "MLO"),
    ("latero-medial", "MLO"),
)


@dataclass
class MammoImage:
    """A decoded view: float32 pixels in [0, 1] (bright = dense) plus what we know about it."""

    pixels: np.ndarray
    view: str
    meta: dict = field(default_factory=dict)


TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "implicit VR little endian",
    "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE lossless",
}


class DicomViewError(MammorgError):
    """The laterality or projection of an image cannot be determined."""


def _laterality(ds: pydicom.Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _projection(ds: pydicom.Dataset) -> str | None:
    for item in ds.get("ViewCodeSequence", []) or []:
        code = str(item.get("CodeValue", "")).strip()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        meaning = str(item.get("CodeMeaning", "")).lower()
        for text, proj in _MEANINGS:
            if text in meaning:
                return proj
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    return _VIEW_POSITIONS.get(position)


def view_of(ds: pydicom.Dataset, path: str | Path = "<dataset>") -> str:
    """``"L_CC"`` etc. from Image Laterality → Laterality, View Code Sequence → View Position."""
    side, proj = _laterality(ds), _projection(ds)
    if side is None:
        raise DicomViewError(f"{path}: laterality unknown (no ImageLaterality/Laterality L or R)")
    if proj is None:
        raise DicomViewError(f"{path}: view unknown (no usable ViewCodeSequence/ViewPosition)")
    return f"{side}_{proj}"


def _voi_range(ds: pydicom.Dataset, arr: np.ndarray) -> tuple[float, float]:
    """Output range of the VOI transform, or the data range where none applies."""
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if "VOILUTSequence" in ds or has_window:
        bits = int(ds.get("BitsStored", 16))
        if "VOILUTSequence" in ds:
            lut_bits = ds.VOILUTSequence[0].LUTDescriptor[2]
            return 0.0, float(2 ** int(lut_bits) - 1)
        return 0.0, float(2**bits - 1)
    lo, hi = np.percentile(arr, [0.0, 100.0])
    return float(lo), float(hi)


def _to_unit_range(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray:
    arr = apply_modality_lut(raw, ds)
    arr = apply_voi_lut(arr, ds, index=0)
    lo, hi = _voi_range(ds, arr)
    out = (np.asarray(arr, dtype=np.float32) - lo) / max(hi - lo, 1e-6)
    out = np.clip(out, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        out[raw == padding] = 0.0
    return out


def _decode_failure(exc: Exception) -> str:
    """pydicom's decoder error in one line: "no installed decoder could read it" with each
    plugin's reason when it tried several."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Unable to decode as exceptions were raised by all available plugins"):
        return "no installed decoder could read it (" + "; ".join(lines[1:]) + ")"
    return lines[0] if lines else type(exc).__name__


def read_header(path: str | Path) -> pydicom.Dataset:
    """Header only (no pixel data), with clear errors."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise MammorgError(f"{path}: not a readable DICOM file ({exc})") from None


MAMMO_MODALITIES = ("MG",)
GREY = ("MONOCHROME1", "MONOCHROME2")


def check_mammogram(ds: pydicom.Dataset, path: str | Path) -> None:
    """Refuse, by name, what is not a grey-scale mammogram: another modality (unless Body Part
    Examined says BREAST), colour (palette or RGB) images, several samples per pixel."""
    modality = str(ds.get("Modality", "") or "").upper()
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    if modality and modality not in MAMMO_MODALITIES and "BREAST" not in body_part:
        raise MammorgError(f"{path}: not a mammogram (modality {modality}, body part {body_part or 'unset'})")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric and photometric not in GREY:
        raise MammorgError(f"{path}: {photometric} image refused (mammograms are grey-scale)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise MammorgError(f"{path}: {ds.SamplesPerPixel} samples per pixel refused (mammograms are grey-scale)")


def read_dicom(path: str | Path, *, allow_for_processing: bool = False, require_view: bool = True) -> MammoImage:
    """Decode a mammogram to float32 in [0, 1], dense tissue bright. ``require_view``: the view
    must be known from the tags (else it is ``"unknown"``)."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise MammorgError(f"{path}: not a readable DICOM file ({exc})") from None
    return decode_dataset(ds, path, allow_for_processing=allow_for_processing, require_view=require_view)


def decode_dataset(
    ds: pydicom.Dataset, path: str | Path, *, allow_for_processing: bool = False, require_view: bool = True
) -> MammoImage:
    """``read_dicom`` on a dataset already read (an upload held in memory); ``path`` names it in
    errors."""
    if "PixelData" not in ds:
        raise MammorgError(f"{path}: no pixel data")
    check_mammogram(ds, path)
    intent = str(ds.get("PresentationIntentType", "")).upper()
    if intent == "FOR PROCESSING" and not allow_for_processing:
        raise MammorgError(f"{path}: FOR PROCESSING image (raw detector data); skipped")
    try:
        view = view_of(ds, path)
    except DicomViewError:
        if require_view:
            raise
        view = "unknown"
    uid = str(getattr(ds.file_meta, "TransferSyntaxUID", "?"))
    try:
        raw = ds.pixel_array
    except Exception as exc:  # decoders raise many types
        raise MammorgError(
            f"{path}: cannot decode pixel data (transfer syntax {uid}, "
            f"{TRANSFER_SYNTAX_NAMES.get(uid, 'unknown')}): {_decode_failure(exc)}"
        ) from None
    if raw.ndim != 2:
        raise MammorgError(f"{path}: expected one grey-scale frame, got shape {raw.shape}")
    meta = {
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "bits_stored": int(ds.get("BitsStored", 16)),
        "transfer_syntax": uid,
        "voi_lut_function": str(ds.get("VOILUTFunction", "") or "LINEAR"),
        "presentation_intent": intent or None,
    }
    return MammoImage(pixels=_to_unit_range(ds, raw), view=view, meta=meta)
