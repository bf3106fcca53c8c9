"""Matplotlib for files, not screens: the Agg canvas is chosen when a figure is made, never at
import, and figures are written through a temporary name."""

from __future__ import annotations

import os
from typing import Any

from mammorg.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing off-screen (Agg), whatever backend the caller configured."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a figure as PNG through a temporary name, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
