"""Coordinates between an original image and its preprocessed (cached) view.

Preprocessing (``mammorg.preprocess.normalise_geometry``) flips the image so the chest wall is
left, crops it to the breast, pads it to the target aspect and resizes it; it records each step
as the view's geometry (``flipped``, ``crop`` [top, bottom, left, right], ``pad_offset`` [top,
left], ``scale``, ``source_shape`` [H, W]). These functions apply the same steps to boxes and
points, so lesion boxes of a manifest reach the cached images and predicted boxes go back to
the pixels of the original DICOM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mammorg.io import MammorgError
from mammorg.schema import Box

GEOMETRY_KEYS = ("flipped", "crop", "pad_offset", "scale", "source_shape")


def _parts(geometry: Mapping[str, Any]) -> tuple[bool, float, float, float, float]:
    missing = [k for k in GEOMETRY_KEYS if k not in geometry]
    if missing:
        raise MammorgError(f"preprocessing geometry lacks {', '.join(missing)} (re-run 'mammorg data preprocess')")
    top, _, left, _ = (float(v) for v in geometry["crop"])
    pad_top, pad_left = (float(v) for v in geometry["pad_offset"])
    width = float(geometry["source_shape"][1])
    return bool(geometry["flipped"]), width, top - pad_top, left - pad_left, float(geometry["scale"])


def point_to_cache(x: float, y: float, geometry: Mapping[str, Any]) -> tuple[float, float]:
    flipped, width, dy, dx, scale = _parts(geometry)
    if flipped:
        x = width - x
    return (x - dx) * scale, (y - dy) * scale


def point_to_original(x: float, y: float, geometry: Mapping[str, Any]) -> tuple[float, float]:
    flipped, width, dy, dx, scale = _parts(geometry)
    x, y = x / scale + dx, y / scale + dy
    return (width - x if flipped else x), y


def box_to_cache(box: Box, geometry: Mapping[str, Any]) -> Box:
    """A box in original-image pixels, in the cached view's pixels."""
    x0, y0 = point_to_cache(box.xmin, box.ymin, geometry)
    x1, y1 = point_to_cache(box.xmax, box.ymax, geometry)
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def box_to_original(box: Box, geometry: Mapping[str, Any]) -> Box:
    """A box in the cached view's pixels, in original-image pixels (clipped to the image)."""
    x0, y0 = point_to_original(box.xmin, box.ymin, geometry)
    x1, y1 = point_to_original(box.xmax, box.ymax, geometry)
    height, width = (float(v) for v in geometry["source_shape"])
    return Box(max(0.0, min(x0, x1)), max(0.0, min(y0, y1)), min(width, max(x0, x1)), min(height, max(y0, y1)))
