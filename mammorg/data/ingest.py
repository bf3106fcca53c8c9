"""``mammorg data ingest``: run an adapter and write the canonical manifest atomically."""

from __future__ import annotations

import os
from pathlib import Path

from mammorg.data.cbis import ingest_cbis
from mammorg.data.common import IngestResult, ReportReader
from mammorg.data.dmid import ingest_dmid
from mammorg.data.folder import ingest_folder
from mammorg.data.vindr import ingest_vindr
from mammorg.io import MammorgError, write_jsonl_atomic

FORMATS = ("vindr", "cbis-ddsm", "dmid", "folder")


def problems_path(manifest: str | Path) -> Path:
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".problems.jsonl")


def run_adapter(fmt: str, root: Path, read_report: ReportReader) -> IngestResult:
    """The exams of ``root`` read by the adapter of ``fmt`` (reports read with ``read_report``)."""
    if fmt == "vindr":
        return ingest_vindr(root)
    if fmt == "cbis-ddsm":
        return ingest_cbis(root)
    if fmt == "dmid":
        return ingest_dmid(root, read_report)
    if fmt == "folder":
        return ingest_folder(root, read_report)
    raise MammorgError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def ingest(fmt: str, root: str | Path, out: str | Path, read_report: ReportReader) -> IngestResult:
    """Ingest ``root`` in format ``fmt``; paths in the manifest are relative to its folder."""
    root, out = Path(root), Path(out)
    if fmt not in FORMATS:
        raise MammorgError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not root.is_dir():
        raise MammorgError(f"{root}: data root is not a folder")
    result = run_adapter(fmt, root, read_report)
    base = out.parent.resolve()
    for exam in result.exams:
        exam.views = {v: (os.path.relpath((root / p).resolve(), base) if p else None) for v, p in exam.views.items()}
    write_jsonl_atomic(out, result.exams)
    write_jsonl_atomic(problems_path(out), result.problems)
    return result
