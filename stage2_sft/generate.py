"""Recipe: ``mammorg stage2 generate --run RUN --manifest M --out GEN.jsonl``.

Reports for the exams of a manifest through the run's ``Reporter``; each output line holds
``id``, ``text`` and the parsed ``structured`` report (docs/design.md section 5).
"""

from __future__ import annotations

from pathlib import Path

from mammorg.io import MammorgError, write_jsonl_atomic
from stage2_sft.data import ReportDataset
from stage2_sft.reporter import GeneratedReport, Reporter


def generate(
    run_dir: str | Path,
    manifest: str | Path,
    out: str | Path,
    predictions: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    num_beams: int | None = None,
) -> list[GeneratedReport]:
    """Generate for every exam of ``manifest`` (of ``split``) and write ``out`` (JSONL)."""
    cfg, reporter = Reporter.from_run(run_dir)
    ds = ReportDataset(
        manifest,
        predictions or cfg.data.predictions,
        reporter.builder,
        split,
        cfg.knowledge.source,
        with_reports=False,
        gold_heads=tuple(cfg.knowledge.gold_heads),
    )
    if len(ds) == 0:
        raise MammorgError(f"{manifest}: no exams to report" + (f" in split '{split}'" if split else ""))
    rows = reporter.generate(ds, batch_size, num_beams, progress=True)
    write_jsonl_atomic(out, rows)
    return rows
