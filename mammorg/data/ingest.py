"""``mammorg data ingest``: run an adapter and write the canonical manifest atomically."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mammorg.data.cbis import ingest_cbis
from mammorg.data.common import IngestResult
from mammorg.data.folder import ingest_dmid, ingest_folder
from mammorg.data.vindr import ingest_vindr
from mammorg.io import MammorgError, write_jsonl_atomic

ADAPTERS: dict[str, Callable[[Path], IngestResult]] = {
    "vindr": ingest_vindr, "cbis-ddsm": ingest_cbis, "dmid": ingest_dmid, "folder": ingest_folder,
}


def problems_path(manifest: str | Path) -> Path:
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".problems.jsonl")


def ingest(fmt: str, root: str | Path, out: str | Path) -> IngestResult:
    """Ingest ``root`` in format ``fmt``; paths in the manifest are relative to its folder."""
    if fmt not in ADAPTERS:
        raise MammorgError(f"unknown format {fmt!r}; choose from {', '.join(ADAPTERS)}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise MammorgError(f"{root}: data root is not a folder")
    result = ADAPTERS[fmt](root)
    base = out.parent.resolve()
    for exam in result.exams:
        exam["views"] = {v: (os.path.relpath((root / p).resolve(), base) if p else None)
                         for v, p in exam["views"].items()}
    write_jsonl_atomic(out, result.exams)
    write_jsonl_atomic(problems_path(out), result.problems)
    return result
