"""16-bit PNG input: the view comes from the file name (``L_CC.png`` etc.)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammorg.dicom import MammoImage
from mammorg.io import MammorgError
from mammorg.labels import VIEWS


def read_png(path: str | Path) -> MammoImage:
    """Read a grey-scale PNG whose stem is a canonical view name."""
    from PIL import Image

    path = Path(path)
    view = path.stem.upper().replace("-", "_")
    if view not in VIEWS:
        raise MammorgError(f"{path}: PNG input must be named after its view ({', '.join(VIEWS)})")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as exc:
        raise MammorgError(f"{path}: cannot read PNG ({exc})") from None
    if arr.ndim != 2:
        raise MammorgError(f"{path}: expected a grey-scale PNG, got shape {arr.shape}")
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return MammoImage(pixels=arr.astype(np.float32) / scale, view=view, meta={"format": "png"})
