"""Recipe: ``mammorg stage1 predict --run RUN --manifest CACHE_MANIFEST --out PRED.jsonl``.

Per exam: probabilities of every head, labels at the run's operating points, and the per-view
visual feature tokens ``[4, N, D]`` saved as safetensors for stage 2. With ``--oof K`` the exams
of the training split are predicted by K fold models that never saw them (out-of-fold), so stage
2 can train on predictions that do not leak the training labels; the visual features still come
from the run's own model, the one used at inference.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mammorg.io import MammorgError, read_jsonl, write_jsonl_atomic
from mammorg.schema import Stage1Prediction
from stage1_classification.config import Stage1Config
from stage1_classification.data import ExamDataset
from stage1_classification.inference import load_run, predict_dataset
from stage1_classification.operating_points import OperatingPoints
from stage1_classification.train import train


def predict_fold(cfg: Stage1Config, run_dir: Path, manifest: str, folds: int, fold: int) -> list[Stage1Prediction]:
    """Train (or resume) fold ``fold`` of ``folds`` under ``RUN/oof/k{folds}/`` and predict its
    held-out training exams at the fold's own operating points. Folds are independent
    (parallelisable); another number of folds splits differently, so it gets its own folder."""
    fold_dir = run_dir / "oof" / f"k{folds}" / f"fold{fold}"
    fold_cfg = dataclasses.replace(
        cfg,
        run_dir=str(fold_dir),
        data=dataclasses.replace(cfg.data, folds=folds, fold=fold),
        train=dataclasses.replace(cfg.train, resume=True, stop_after_epochs=None),
    )
    print(f"[oof] fold {fold + 1}/{folds}: {fold_dir}", file=sys.stderr)
    train(fold_cfg, plots=False)
    _, model = load_run(fold_dir)
    held_out = ExamDataset(manifest, cfg.data.train_split, folds=folds, fold=fold, holdout=True)
    records = predict_dataset(
        model,
        held_out,
        progress=False,
        points=OperatingPoints.load(fold_dir),
        num_workers=cfg.data.num_workers,
    )
    return [dataclasses.replace(rec, source=f"oof-fold{fold}") for rec in records]


def oof_folds(predictions: str | Path) -> int:
    """Number of out-of-fold models behind a predictions file (0: none)."""
    return len({r.get("source") for r in read_jsonl(predictions) if str(r.get("source")).startswith("oof-")})


def predict(
    run_dir: str | Path,
    manifest: str | Path,
    out: str | Path,
    features: str | Path | None = None,
    oof: int = 0,
    batch_size: int = 8,
) -> list[Stage1Prediction]:
    """Predict every exam of a cached manifest; optionally out-of-fold on the training split."""
    run_dir, out = Path(run_dir), Path(out)
    if oof == 1 or oof < 0:
        raise MammorgError(f"--oof {oof}: out-of-fold prediction needs at least 2 folds")
    cfg, model = load_run(run_dir)
    features_dir = None
    if features is not None:
        features_dir = Path(features)
        features_dir.mkdir(parents=True, exist_ok=True)
    dataset = ExamDataset(manifest)
    if dataset.skipped:
        print(
            f"warning: {len(dataset.skipped)} exam(s) have no usable view and are not predicted: "
            + ", ".join(dataset.skipped[:5]),
            file=sys.stderr,
        )
    records = predict_dataset(
        model,
        dataset,
        batch_size,
        features_dir,
        points=OperatingPoints.load(run_dir),
        num_workers=cfg.data.num_workers,
    )
    if oof:
        folded = {
            rec.exam_id: rec for fold in range(oof) for rec in predict_fold(cfg, run_dir, str(manifest), oof, fold)
        }
        records = [
            dataclasses.replace(folded[r.exam_id], features=r.features) if r.exam_id in folded else r for r in records
        ]
    if features_dir is not None and features_dir.parent.resolve() != out.parent.resolve():
        for r in records:  # feature paths are stored relative to the prediction file
            r.features = str((features_dir / Path(str(r.features)).name).resolve())
    write_jsonl_atomic(out, records)
    return records
