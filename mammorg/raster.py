"""Raster input (16-bit PNG, TIFF): pixels without DICOM tags. The view comes from the file name
(``L_CC.png``) where it is one; a data set that gives views elsewhere (DMID's TIFF images) does
not need it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammorg.dicom import MammoImage
from mammorg.io import MammorgError
from mammorg.labels import VIEWS

RASTER_SUFFIXES = (".png", ".tif", ".tiff")


def view_from_name(path: Path) -> str | None:
    view = path.stem.upper().replace("-", "_")
    return view if view in VIEWS else None


def read_raster(path: str | Path, require_view: bool = False) -> MammoImage:
    """A grey-scale PNG or TIFF as float32 in [0, 1]; ``require_view``: the name must be a view."""
    from PIL import Image

    path = Path(path)
    view = view_from_name(path)
    if require_view and view is None:
        raise MammorgError(
            f"{path}: image files without DICOM tags must be named after their view ({', '.join(VIEWS)})"
        )
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as exc:
        raise MammorgError(f"{path}: cannot read image ({exc})") from None
    if arr.ndim != 2:
        raise MammorgError(f"{path}: expected a grey-scale image, got shape {arr.shape} (colour refused)")
    scale = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else max(float(arr.max()), 1.0)
    return MammoImage(pixels=arr.astype(np.float32) / scale, view=view or "unknown", meta={"format": path.suffix[1:]})
