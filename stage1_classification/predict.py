"""Recipe: ``mammorg stage1 predict --run RUN --manifest CACHE_MANIFEST --out PRED.jsonl``.

Per exam: probabilities of every head, labels at the run's operating points, and (with
``--features DIR``) the per-view visual feature tokens ``[4, N, D]`` saved as safetensors for
stage 2. With ``--oof K`` the exams of the training split are predicted by K fold models that
never saw them (out-of-fold), so stage 2 can train on predictions that do not leak the training
labels; the visual features still come from the run's own model, the one used at inference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import DictConfig

from mammorg.io import MammorgError, read_jsonl, write_jsonl_atomic
from stage1_classification.data import ExamDataset
from stage1_classification.inference import load_run, predict_dataset
from stage1_classification.operating_points import OperatingPoints
from stage1_classification.train import run as train_run


def predict_fold(cfg: DictConfig, run_dir: Path, manifest: str, folds: int, fold: int) -> list[dict]:
    """Train (or resume) fold ``fold`` of ``folds`` under ``RUN/oof/k{folds}/`` and predict its
    held-out training exams at the fold's own operating points. Folds are independent
    (parallelisable); another number of folds splits differently, so it gets its own folder."""
    fold_dir = run_dir / "oof" / f"k{folds}" / f"fold{fold}"
    fold_cfg = cfg.copy()
    fold_cfg.run_dir, fold_cfg.data.folds, fold_cfg.data.fold = str(fold_dir), folds, fold
    fold_cfg.train.resume, fold_cfg.train.stop_after_epochs = True, None
    print(f"[oof] fold {fold + 1}/{folds}: {fold_dir}")
    train_run(fold_cfg, plots=False)
    _, model = load_run(fold_dir)
    held_out = ExamDataset(manifest, cfg.data.train_split, folds=folds, fold=fold, holdout=True)
    return [{**rec, "source": f"oof-fold{fold}"} for rec in
            predict_dataset(model, held_out, progress=False, points=OperatingPoints.load(fold_dir),
                            num_workers=cfg.data.num_workers)]


def _fold_predictions(cfg: DictConfig, run_dir: Path, manifest: str, folds: int) -> dict[str, dict]:
    """Out-of-fold records for the training split: fold i's model never saw fold i's exams."""
    return {rec["exam_id"]: rec for fold in range(folds)
            for rec in predict_fold(cfg, run_dir, manifest, folds, fold)}


def oof_folds(predictions: str | Path) -> int:
    """Number of out-of-fold models behind a predictions file (0: none)."""
    return len({r.get("source") for r in read_jsonl(predictions) if str(r.get("source")).startswith("oof-")})


def predict(run_dir: str | Path, manifest: str | Path, out: str | Path,
            features: str | Path | None = None, oof: int = 0, batch_size: int = 8) -> list[dict]:
    """Predict every exam of a cached manifest; optionally out-of-fold on the training split."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, model = load_run(run_dir)
    features_dir = None
    if features is not None:
        features_dir = Path(features)
        features_dir.mkdir(parents=True, exist_ok=True)
    dataset = ExamDataset(manifest)
    if dataset.skipped:
        print(f"warning: {len(dataset.skipped)} exam(s) have no usable view and are not predicted: "
              + ", ".join(dataset.skipped[:5]))
    records = predict_dataset(model, dataset, batch_size, features_dir,
                              points=OperatingPoints.load(run_dir), num_workers=cfg.data.num_workers)
    if oof:
        if oof < 2:
            raise MammorgError(f"--oof {oof}: out-of-fold prediction needs at least 2 folds")
        folded = _fold_predictions(cfg, run_dir, str(manifest), oof)
        records = [{**folded[r["exam_id"]], **({"features": r["features"]} if "features" in r else {})}
                   if r["exam_id"] in folded else {**r, "source": "model"} for r in records]
    if features_dir is not None and features_dir.parent.resolve() != out.parent.resolve():
        for r in records:  # feature paths are stored relative to the prediction file
            r["features"] = str((features_dir / Path(r["features"]).name).resolve())
    write_jsonl_atomic(out, records)
    return records


def main(args: argparse.Namespace) -> None:
    features = args.features
    if features is None:
        features = Path(args.out).parent / "features"
    records = predict(args.run, args.manifest, args.out, features, args.oof, args.batch_size)
    print(json.dumps({"predictions": str(args.out), "exams": len(records),
                      "features": str(features), "oof_folds": args.oof}))
