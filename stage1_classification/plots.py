"""Stage-1 run plots: learning curve and validation confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.plots import confusion_png
from mammorg.labels import BIRADS_CLASSES, DENSITIES, SIDES
from mammorg.plotting import pyplot, save_figure
from mammorg.schema import Exam, Stage1Prediction


def learning_curve_png(metrics_log: Path, out: Path) -> None:
    """Training loss and validation scores per epoch from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics_log.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(8, 3))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    for key in ("birads_f1", "density_f1", "finding_auroc_mean"):
        ax2.plot(epochs, [r["val"].get(key) for r in rows], marker="o", label=key)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)


def confusion_pngs(records: list[Stage1Prediction], exams: list[Exam], out_dir: Path) -> None:
    """Density and per-breast BI-RADS confusion matrices of predictions against labels."""
    by_id = {e.exam_id: e.labels for e in exams}
    dens_ref = [by_id[r.exam_id].density for r in records]
    confusion_png(
        dens_ref,
        [r.pred.density for r in records],
        list(DENSITIES),
        "density (validation)",
        out_dir / "confusion_density.png",
    )
    ref, pred = [], []
    for r in records:
        for side in SIDES:
            truth = by_id[r.exam_id].birads.get(side)
            if truth in BIRADS_CLASSES:
                ref.append(truth)
                pred.append(r.pred.birads[side])
    confusion_png(ref, pred, list(BIRADS_CLASSES), "BI-RADS per breast (validation)", out_dir / "confusion_birads.png")
