"""Stage 1 on the knowledge-benchmark synthetic set: today's pooled classifier beside the
localising one (heatmaps + multiple-instance pooling + box loss), MIL pooling ablation and a
learning curve, all scored on the test split.

The set is ``pipeline/benchmark``'s: 900 exams (seed 0, 256x128 DICOMs, 25% test). Each row is
a stage-1 config with overrides, a preprocessing size and a number of training exams (nested
subsets of one training split; validation exams pick the best epoch). Test metrics: finding AUROC
per breast (mean and per finding), exam and per-breast BI-RADS macro-F1 and density macro-F1 of
the decisions at the run's operating points, descriptor accuracy on the breasts whose labels
name one (the most suspicious lesion's), pointing-game hit rate and FROC sensitivity at one
false positive per image (localising rows). The reference is the first row (today's model),
trained and scored in the same run: ``ratio_birads_f1_vs_reference``.

Usage:
  python benchmarks/stage1_localisation.py [--out runs/bench-stage1-loc] [--rows today localise ...]
  python benchmarks/stage1_localisation.py --list
  (rows in parallel: --prepare-only once, then one process per row with --result ROW.json)
Prints one JSON object (and writes it to OUT/result.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

from evaluation.parser import parse_report
from mammorg.config import load_config
from mammorg.data.ingest import ingest
from mammorg.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from mammorg.labels import BIRADS_CLASSES, DENSITIES, FINDINGS, SIDES, most_severe
from mammorg.preprocess import PreprocessSpec, preprocess_manifest
from mammorg.synth.writer import SynthSettings, synthesise
from stage1_classification.config import Stage1Config
from stage1_classification.data import ExamDataset
from stage1_classification.inference import load_run, predict_dataset
from stage1_classification.localisation import localisation_metrics
from stage1_classification.operating_points import OperatingPoints
from stage1_classification.train import loader, train, validation_pass

SIZE_LOW, SIZE_HIGH, SIZE_GPU = (128, 64), (256, 128), (1024, 512)
NO_CROPS = ["model.lesion_crops=false", "train.crop_epochs=0"]
# name: (config overrides, preprocessing size, training exams or None for all)
ROWS: dict[str, tuple[list[str], tuple[int, int], int | None]] = {
    "today": (["model.localise=false", *NO_CROPS], SIZE_LOW, None),
    "today_256": (["model.localise=false", *NO_CROPS], SIZE_HIGH, None),
    "localise": ([], SIZE_HIGH, None),  # the default: heatmaps, lesion crops and the crop reader's phase
    "localise_topk": (["model.mil_pooling=topk"], SIZE_HIGH, None),
    "localise_attention": (["model.mil_pooling=attention"], SIZE_HIGH, None),
    "localise_no_box_loss": (["train.localisation_weight=0"], SIZE_HIGH, None),
    "localise_pooled": (["model.lesion_features=false", *NO_CROPS], SIZE_HIGH, None),
    "localise_lesion": (["model.lesion_features=true", *NO_CROPS], SIZE_HIGH, None),
    "localise_crops": (["model.lesion_crops=true", "train.crop_epochs=0"], SIZE_HIGH, None),
    "localise_crop_reader": (["model.lesion_crops=true", "train.crop_epochs=100"], SIZE_HIGH, None),
    "localise_jitter": (["train.crop_jitter=0.2"], SIZE_HIGH, None),  # training crops off the box centres
    "curve_150": ([], SIZE_HIGH, 150),
    "curve_360": ([], SIZE_HIGH, 360),
    "curve_700": ([], SIZE_HIGH, 700),
    "localise_1024": ([], SIZE_GPU, None),  # stage1/gpu: DICOMs rendered and preprocessed at 1024x512
}
CONFIG_OF = {"localise_1024": "stage1/gpu"}  # rows on another shipped config than stage1/default


def prepare(out: Path, exams: int, workers: int, sizes: set[tuple[int, int]]) -> dict[tuple[int, int], Path]:
    """The synthetic set, ingested and preprocessed at ``sizes`` (reused when present). The
    DICOMs are rendered at 256x128, and at 1024x512 for that size: the same exams, labels and
    splits (drawn before rendering), lesions drawn at the finer resolution."""
    caches = {}
    for size in sorted(sizes):
        render = SIZE_GPU if size == SIZE_GPU else SIZE_HIGH
        tag = "" if render == SIZE_HIGH else f"-{render[0]}x{render[1]}"
        synth = out / f"synth{tag}"
        if not (synth / "manifest.jsonl").exists():
            settings = SynthSettings(exams=exams, seed=0, height=render[0], width=render[1], test_fraction=0.25)
            synthesise(synth, settings, progress=False, workers=workers)
        manifest = out / f"manifest{tag}.jsonl"
        if not manifest.exists():
            ingest("vindr", synth, manifest, parse_report)
        cache = out / f"cache-{size[0]}x{size[1]}"
        if not (cache / "manifest.jsonl").exists():
            preprocess_manifest(manifest, cache, PreprocessSpec(*size), workers=workers, progress=False)
        caches[size] = cache / "manifest.jsonl"
    return caches


def subset(manifest: Path, n_train: int | None, path: Path) -> Path:
    rows = read_jsonl(manifest)
    train_rows = [r for r in rows if r["split"] == "train"]
    keep = {r["exam_id"] for r in (train_rows if n_train is None else train_rows[:n_train])}
    write_jsonl_atomic(path, [r for r in rows if r["split"] != "train" or r["exam_id"] in keep])
    return path


def _macro_f1(truth: list[str], pred: list[str]) -> float:
    return float(f1_score(truth, pred, average="macro")) if truth else float("nan")


def test_metrics(run_dir: Path, manifest: Path, workers: int) -> dict:
    cfg, model = load_run(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    ds = ExamDataset(manifest, "test")
    points = OperatingPoints.load(run_dir)
    records = predict_dataset(model, ds, progress=False, points=points, num_workers=workers)
    by_id = {e.exam_id: e for e in ds.exams}
    probs, truth = {f: [] for f in FINDINGS}, {f: [] for f in FINDINGS}
    exam_t, exam_p, side_t, side_p, dens_t, dens_p = [], [], [], [], [], []
    desc_hits: dict[str, list[bool]] = {}
    for rec in records:
        labels = by_id[rec.exam_id].labels
        for side in SIDES:
            side_probs = (rec.probs.findings or {}).get(side)
            for f in FINDINGS:
                state = labels.findings[side].get(f)
                if side_probs and state in ("pos", "neg"):
                    probs[f].append(side_probs[f])
                    truth[f].append(state == "pos")
            for name, value in (labels.descriptors.get(side) or {}).items():
                guess = (rec.pred.descriptors.get(side) or {}).get(name)
                if guess is not None:
                    desc_hits.setdefault(name, []).append(guess == value)
            if labels.birads.get(side) in BIRADS_CLASSES and rec.pred.birads.get(side):
                side_t.append(labels.birads[side])
                side_p.append(rec.pred.birads[side])
        exam = labels.birads.get("exam") or most_severe([labels.birads.get(s) for s in SIDES])
        if exam and rec.pred.birads.get("exam"):
            exam_t.append(exam)
            exam_p.append(rec.pred.birads["exam"])
        if labels.density in DENSITIES:
            dens_t.append(labels.density)
            dens_p.append(rec.pred.density)
    aurocs = {f: round(float(roc_auc_score(truth[f], probs[f])), 4) for f in FINDINGS if len(set(truth[f])) == 2}
    out = {
        "test_exams": len(records),
        "finding_auroc": aurocs,
        "finding_auroc_mean": round(float(np.mean(list(aurocs.values()))), 4),
        "birads_exam_macro_f1": round(_macro_f1(exam_t, exam_p), 4),
        "birads_breast_macro_f1": round(_macro_f1(side_t, side_p), 4),
        "density_macro_f1": round(_macro_f1(dens_t, dens_p), 4),
        "descriptor_accuracy": {k: round(float(np.mean(v)), 4) for k, v in sorted(desc_hits.items())},
    }
    if cfg.model.localise:
        outputs, batches = validation_pass(model, loader(ds, cfg, False), device)
        loc = localisation_metrics(outputs, batches)
        out["pointing_game"] = {k: round(v, 4) for k, v in loc["pointing_game"].items()}
        out["pointing_game_mass_calc"] = round(loc["pointing_game_mass_calc"], 4)
        out["froc_sensitivity_at_1fp"] = {k: round(v, 4) for k, v in loc["froc_sensitivity_at_1fp"].items()}
        out["froc_sensitivity_at_1fp_all"] = round(loc["froc_sensitivity_at_1fp_all"], 4)
    return out


def run_row(
    name: str, caches: dict, out: Path, epochs: int, workers: int, batch_size: int | None, seed: int = 0
) -> dict:
    overrides, size, n_train = ROWS[name]
    manifest = subset(caches[size], n_train, caches[size].parent / f"subset-{name}.jsonl")
    label = f"{name}_seed{seed}" if seed else name
    run_dir = out / f"run-{label}"
    extra = [f"train.batch_size={batch_size}"] if batch_size else []
    extra += [f"seed={seed}"] if seed else []
    cfg = load_config(
        CONFIG_OF.get(name, "stage1/default"),
        Stage1Config,
        [
            f"data.cache_manifest={manifest}",
            f"run_dir={run_dir}",
            f"train.epochs={epochs}",
            f"data.num_workers={workers}",
            "data.val_split=val",
            *extra,
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    train(cfg, plots=False)
    seconds = time.perf_counter() - t0
    train_exams = sum(1 for r in read_jsonl(manifest) if r["split"] == "train")
    return {
        "row": label,
        "seed": seed,
        "config": CONFIG_OF.get(name, "stage1/default"),
        "overrides": overrides,
        "size": list(size),
        "train_exams": train_exams,
        "train_seconds": round(seconds, 1),
        **test_metrics(run_dir, manifest, workers),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-stage1-loc")
    ap.add_argument("--rows", nargs="+", default=["today", "localise"])
    ap.add_argument("--exams", type=int, default=900)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--prepare-only", action="store_true", help="write the data set and the caches of --rows only")
    ap.add_argument("--prep-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed (rows other than 0 are named ROW_seedN)")
    ap.add_argument("--result", default="result.json", help="file name of this invocation's JSON under --out")
    args = ap.parse_args()
    if args.list:
        listed = {
            k: {"config": CONFIG_OF.get(k, "stage1/default"), "overrides": v[0], "size": v[1], "train_exams": v[2]}
            for k, v in ROWS.items()
        }
        print(json.dumps(listed))
        return
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; see --list")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = prepare(out, args.exams, args.prep_workers, {ROWS[name][1] for name in args.rows})
    if args.prepare_only:
        print(json.dumps({"prepared": {f"{h}x{w}": str(p) for (h, w), p in caches.items()}}))
        return
    rows = [run_row(name, caches, out, args.epochs, args.workers, args.batch_size, args.seed) for name in args.rows]
    reference = rows[0]
    for row in rows:
        row["ratio_birads_f1_vs_reference"] = round(
            row["birads_exam_macro_f1"] / max(reference["birads_exam_macro_f1"], 1e-9), 3
        )
    result = {
        "benchmark": "stage1_localisation",
        "reference": reference["row"],
        "epochs": args.epochs,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": rows,
    }
    write_json_atomic(out / args.result, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
