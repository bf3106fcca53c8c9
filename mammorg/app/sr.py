"""A report as a DICOM Comprehensive Structured Report (highdicom), stored next to the images.

Content (TID 1500, Measurement Report): one planar-ROI group per grounded finding of stage 1 (a
finding with a box): its finding type (SNOMED CT / DCM codes), the breast as finding site, the
box as an image region (closed polyline, in the pixels of the referenced view) and stage 1's score
as a probability; the narrative report is added to the root container as an Impression text
item. The SR references the source study, series and instances (evidence) and nothing else of
the source: patient name, ID, birth date, sex, accession number and the referring physician are
left empty.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from mammorg.io import MammorgError, atomic_path
from mammorg.schema import GroundedFinding

FINDING_CODES = {
    "mass": codes.SCT.Mass,
    "calcification": codes.SCT.CalcificationOfBreast,
    "architectural_distortion": codes.DCM.ArchitecturalDistortion,
    "asymmetry": codes.SCT.AsymmetricBreastTissue,
    "lymph_node": codes.SCT.LymphNode,
    "skin_thickening": codes.SCT.SkinThickeningOfBreast,
    "nipple_retraction": codes.SCT.NippleRetraction,
}
SIDE_CODES = {"L": codes.SCT.LeftBreast, "R": codes.SCT.RightBreast}
IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "PatientAge",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
EMPTY = "(no report text)"  # a text item cannot be empty


def _deidentified(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a source image's header (no pixels) without the patient's identity."""
    out = copy.deepcopy(ds)
    for keyword in IDENTITY:  # present and empty (highdicom copies the patient and study modules)
        setattr(out, keyword, "")
    if "PixelData" in out:
        del out.PixelData
    return out


def _region(finding: GroundedFinding, source: pydicom.Dataset) -> hd.sr.ImageRegion:
    assert finding.box is not None
    b = finding.box
    points = np.array([[b.xmin, b.ymin], [b.xmax, b.ymin], [b.xmax, b.ymax], [b.xmin, b.ymax], [b.xmin, b.ymin]])
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points.astype(np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def structured_report(
    text: str, grounded: Sequence[GroundedFinding], sources: dict[str, pydicom.Dataset]
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of one exam: ``sources`` maps views (``L_CC``...) to their DICOM
    headers; grounded findings on views without a source are left out of the regions."""
    if not sources:
        raise MammorgError("a structured report needs the exam's DICOM images to reference")
    evidence = {view: _deidentified(ds) for view, ds in sources.items()}
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="mammorg", manufacturer_name="mammorg")
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups = []
    for i, finding in enumerate(g for g in grounded if g.box is not None and g.view in evidence):
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(), identifier=f"{finding.side} {finding.finding} {i + 1}"
                ),
                referenced_region=_region(finding, evidence[str(finding.view)]),
                finding_type=FINDING_CODES[finding.finding],
                finding_sites=[hd.sr.FindingSite(anatomic_location=SIDE_CODES[finding.side])],
                measurements=[
                    hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(finding.score), 4), unit=NO_UNITS)
                ],
            )
        )
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=groups or None,
        title=codes.DCM.ImagingMeasurementReport,
    )
    first = next(iter(evidence.values()))
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence.values()),
        content=content,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="mammorg",
        series_description="mammorg generated report",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Impression,
            value=text[:65535] or EMPTY,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    for keyword in IDENTITY:  # copied from the evidence by highdicom: left empty
        if keyword in sr and keyword not in ("StudyDate", "StudyTime"):
            setattr(sr, keyword, "")
    sr.StudyInstanceUID = first.StudyInstanceUID
    return sr


def write_sr(sr: pydicom.Dataset, path: str | Path) -> Path:
    """Write the SR through a temporary name."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return path


def read_back(path_or_bytes: str | Path | bytes) -> tuple[str, list[dict]]:
    """(narrative, regions) of an SR written here, read with highdicom: each region as
    ``{"finding", "side", "points", "sop_instance_uid"}``."""
    import io

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    sr: Any = hd.sr.srread(source)
    impression = codes.DCM.Impression.value
    text = next(
        (
            str(item.TextValue)
            for item in sr.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == impression
        ),
        "",
    )
    text = "" if text == EMPTY else text
    regions = []
    for group in sr.content.get_planar_roi_measurement_groups():
        finding = next(k for k, c in FINDING_CODES.items() if c == group.finding_type)
        side = next(k for k, c in SIDE_CODES.items() if c == group.finding_sites[0].value)
        region = group.roi
        regions.append(
            {
                "finding": finding,
                "side": side,
                "points": np.asarray(region.value).tolist(),
                "sop_instance_uid": region.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                if hasattr(region, "ReferencedSOPSequence")
                else region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            }
        )
    return text, regions
