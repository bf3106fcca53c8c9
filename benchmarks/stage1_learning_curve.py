"""Stage-1 learning curve on synthetic exams: validation metrics vs. number of training exams.

Usage: python benchmarks/stage1_learning_curve.py [--exams 480] [--sizes 60 150 360] [--size 128 64]
Trains configs/stage1/default.yaml on nested subsets of one synthetic training split, evaluates
each on the same validation exams, prints one JSON object and writes learning_curve_data.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.parser import parse_report  # noqa: E402
from mammorg.config import load_config  # noqa: E402
from mammorg.data.ingest import ingest  # noqa: E402
from mammorg.io import read_jsonl, write_jsonl_atomic  # noqa: E402
from mammorg.plotting import pyplot, save_figure  # noqa: E402
from mammorg.preprocess import PreprocessSpec, preprocess_manifest  # noqa: E402
from mammorg.synth.writer import SynthSettings, synthesise  # noqa: E402
from stage1_classification.config import Stage1Config  # noqa: E402
from stage1_classification.train import train  # noqa: E402

CHANCE = {
    "birads_f1": "macro-F1 of a constant majority guess is at most 1/k of the classes seen",
    "density_f1": "0.25 accuracy for 4 balanced classes",
}


def prepare(out: Path, exams: int, size: tuple[int, int], difficulty: float) -> Path:
    if not (out / "cache" / "manifest.jsonl").exists():
        synthesise(out / "synth", SynthSettings(exams=exams, seed=11, height=256, width=128, difficulty=difficulty))
        ingest("vindr", out / "synth", out / "manifest.jsonl", parse_report)
        preprocess_manifest(out / "manifest.jsonl", out / "cache", PreprocessSpec(*size), workers=2)
    return out / "cache" / "manifest.jsonl"


def subset(manifest: Path, n_train: int, out: Path) -> Path:
    rows = read_jsonl(manifest)
    train = [r for r in rows if r["split"] == "train"][:n_train]
    val = [r for r in rows if r["split"] != "train"]
    for r in val:
        r["split"] = "val"
    write_jsonl_atomic(out, train + val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exams", type=int, default=480)
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 150, 360])
    ap.add_argument("--out", default="runs/bench-stage1-curve")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    ap.add_argument("--difficulty", type=float, default=0.5, help="synthetic lesion difficulty (0-1)")
    ap.add_argument("overrides", nargs="*", help="key=value for configs/stage1/default.yaml")
    args = ap.parse_args()
    out = Path(args.out)
    manifest = prepare(out, args.exams, tuple(args.size), args.difficulty)
    results = []
    for n in args.sizes:
        sub = subset(manifest, n, manifest.parent / f"subset-{n}.jsonl")
        cfg = load_config(
            "stage1/default",
            Stage1Config,
            [
                f"data.cache_manifest={sub}",
                f"run_dir={out / f'run-{n}'}",
                f"train.epochs={args.epochs}",
                *args.overrides,
            ],
        )
        t0 = time.perf_counter()
        train(cfg)
        log = [json.loads(x) for x in (out / f"run-{n}" / "metrics.jsonl").read_text().splitlines()]
        best = max(log, key=lambda r: r["val"].get("score", -1))["val"]
        results.append(
            {
                "train_exams": n,
                "seconds": round(time.perf_counter() - t0, 1),
                **{
                    k: round(best[k], 3)
                    for k in ("birads_acc", "birads_f1", "density_acc", "density_f1", "finding_auroc_mean")
                    if k in best
                },
            }
        )
    val_n = sum(1 for r in read_jsonl(manifest) if r["split"] != "train")
    _plot(results, out / "learning_curve_data.png")
    print(
        json.dumps(
            {
                "benchmark": "stage1_learning_curve",
                "val_exams": val_n,
                "overrides": args.overrides,
                "difficulty": args.difficulty,
                "config": "stage1/default",
                "points": results,
                "plot": str(out / "learning_curve_data.png"),
            }
        )
    )


def _plot(results: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    xs = [r["train_exams"] for r in results]
    for key in ("birads_f1", "density_f1", "finding_auroc_mean"):
        ax.plot(xs, [r.get(key) for r in results], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("training exams")
    ax.set_ylabel("validation (best epoch)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
