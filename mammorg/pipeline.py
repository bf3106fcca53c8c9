"""The whole pipeline from one YAML (``mammorg demo``, ``scripts/pipeline.sh CONFIG OUT``).

synthesise → ingest → preprocess → stage-1 train → predict (out-of-fold) → stage-2 train →
generate → evaluate → export → report on a held-out exam → ``index.html``. Every step is run
through the command-line interface (the same commands a user types), so the library imports no
recipe; steps whose outputs exist are reused (the training recipes resume).
"""
from __future__ import annotations

import argparse
import contextlib
import html
import io
import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mammorg.config import load_config
from mammorg.io import (MammorgError, read_jsonl, save_figure_atomic, write_json_atomic,
                        write_jsonl_atomic, write_text_atomic)
from mammorg.preprocess import load_cached
from stage1_classification.predict import oof_folds

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "demo.yaml"


class Pipeline:
    """Runs the steps of a pipeline config into one output folder."""

    def __init__(self, cfg: DictConfig, config_dir: Path, out: Path):
        self.cfg, self.config_dir, self.out = cfg, config_dir, out
        self.timings: dict[str, float] = {}

    def path(self, rel: str) -> str:
        return str(self.out / rel)

    def cli(self, step: str, argv: list[str], capture: bool = False) -> str:
        """Run one ``mammorg`` command; a failing step stops the pipeline with its name."""
        from mammorg.cli import main as cli_main

        print(f"[pipeline] {step}: mammorg {' '.join(argv[:3])} ...", flush=True)
        t0 = time.perf_counter()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
            rc = cli_main(argv)
        self.timings[step] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise MammorgError(f"pipeline step '{step}' failed (exit {rc})")
        return buffer.getvalue()

    def stage_config(self, name: str) -> str:
        return str((self.config_dir / self.cfg[name].config).resolve())

    def run(self) -> dict:
        cache = self.prepare_data()
        self.train_stage1("stage1", list(self.cfg.stage1.overrides))
        self.train_stage2("stage2", "stage1", list(self.cfg.stage2.overrides))
        self.generate_and_evaluate("stage2", "")
        c, p = self.cfg, self.path
        self.cli("export", ["export", "--run", p("stage2"), "--out", p("bundle"), "--metrics",
                            p("evaluation/metrics.json")] + (["--merge-lora"] if c.export.merge_lora else []),
                 True)
        held_out = self.held_out_exam(cache)
        report = json.loads(self.cli("report", ["report", "--bundle", p("bundle"), held_out["folder"],
                                                "--json"], True))
        write_json_atomic(self.out / "report_example.json", {**report, "exam_id": held_out["exam_id"]})
        return self.summary(report)

    def prepare_data(self) -> str:
        """synthesise → ingest → preprocess; returns the cache manifest."""
        c, p = self.cfg, self.path
        if not (self.out / "synth" / "manifest.jsonl").exists():
            split = [] if c.synth.get("test_fraction") is None else \
                ["--test-fraction", str(c.synth.test_fraction)]  # else the CLI default
            self.cli("synthesise", ["synth", "--out", p("synth"), "--exams", str(c.synth.exams),
                                    "--seed", str(c.synth.seed), "--size", str(c.synth.height),
                                    str(c.synth.width), "--styles", ",".join(c.synth.styles),
                                    *split], True)
        self.cli("ingest", ["data", "ingest", "--format", "vindr", "--root", p("synth"),
                            "--out", p("manifest.jsonl")], True)
        self.cli("preprocess", ["data", "preprocess", "--manifest", p("manifest.jsonl"), "--out",
                                p("cache"), "--size", str(c.preprocess.height),
                                str(c.preprocess.width), "--workers", str(c.preprocess.workers)], True)
        self.write_references(p("cache/manifest.jsonl"))
        return p("cache/manifest.jsonl")

    def train_stage1(self, run: str, overrides: list[str]) -> None:
        """Stage-1 training, then predictions (out-of-fold on the training split) with features."""
        cache = self.path("cache/manifest.jsonl")
        self.cli("stage-1 train", ["stage1", "train", "--config", self.stage_config("stage1"),
                                   f"data.cache_manifest={cache}", f"run_dir={self.path(run)}",
                                   *overrides])
        predictions = self.out / run / "predictions.jsonl"
        if not predictions.exists() or oof_folds(predictions) != self.cfg.stage1.oof_folds:
            self.cli("stage-1 predict", ["stage1", "predict", "--run", self.path(run), "--manifest",
                                         cache, "--out", self.path(f"{run}/predictions.jsonl"),
                                         "--oof", str(self.cfg.stage1.oof_folds)])

    def train_stage2(self, run: str, stage1_run: str, overrides: list[str]) -> None:
        self.cli("stage-2 train", ["stage2", "train", "--config", self.stage_config("stage2"),
                                   f"data.manifest={self.path('cache/manifest.jsonl')}",
                                   f"run_dir={self.path(run)}",
                                   f"data.predictions={self.path(stage1_run + '/predictions.jsonl')}",
                                   f"data.stage1_run={self.path(stage1_run)}", *overrides])

    def generate_and_evaluate(self, run: str, prefix: str) -> None:
        """``{prefix}generated.jsonl`` on the test split and ``{prefix}evaluation/``."""
        c, p = self.cfg, self.path
        self.cli("generate", ["stage2", "generate", "--run", p(run), "--manifest",
                              p("cache/manifest.jsonl"), "--out", p(f"{prefix}generated.jsonl"),
                              "--split", c.generate.split])
        self.cli("evaluate", ["evaluate", "--pred", p(f"{prefix}generated.jsonl"), "--ref",
                              p("references.jsonl"), "-o", p(f"{prefix}evaluation"), "--bootstrap",
                              str(c.evaluate.bootstrap), *([] if c.evaluate.meteor else ["--no-meteor"])],
                 True)

    def write_references(self, cache: str) -> None:
        rows = [{"id": r["exam_id"], "text": r["report"]} for r in read_jsonl(cache)
                if r.get("split") == self.cfg.generate.split and r.get("report")]
        write_jsonl_atomic(self.out / "references.jsonl", rows)

    def held_out_exam(self, cache: str) -> dict:
        """A test exam's image folder (the synthetic layout keeps one folder per study)."""
        exam = next(r for r in read_jsonl(cache) if r.get("split") == self.cfg.generate.split)
        folder = Path(next(v for v in exam["views"].values() if v)).parent
        return {"exam_id": exam["exam_id"], "folder": str(folder)}

    def summary(self, report: dict) -> dict:
        metrics = json.loads((self.out / "evaluation" / "metrics.json").read_text())
        s1 = read_jsonl(self.out / "stage1" / "metrics.jsonl")
        keys = ("birads_f1", "birads_acc", "density_f1", "finding_f1", "bleu_1", "bleu_4",
                "rouge_l", "cider", "meteor")
        summary = {"generated_test_reports": metrics.get("n"),
                   "metrics": {k: metrics.get(k) for k in keys},
                   "stage1_val": {k: v for k, v in max(s1, key=lambda r: r["val"].get("score", -1))["val"].items()
                                  if isinstance(v, float)} if s1 else {},
                   "stage1_test_as_report": stage1_as_report_metrics(
                       parsed_references(self.out), self.out / "stage1" / "predictions.jsonl"),
                   "report_seconds": report.get("seconds"), "timings_s": self.timings,
                   "seconds": round(sum(self.timings.values()), 1)}
        write_json_atomic(self.out / "summary.json", summary)
        write_text_atomic(self.out / "index.html", index_html(self.out, summary, report))
        return summary


def parsed_references(out: Path) -> dict[str, dict]:
    """The test-split reference reports of a pipeline folder, parsed once."""
    from evaluation.parser import parse_report

    return {r["id"]: parse_report(r["text"]) for r in read_jsonl(out / "references.jsonl")}


def stage1_as_report_metrics(refs: dict[str, dict], predictions: Path) -> dict:
    """Stage-1 labels (operating points) scored like generated reports (same references, metrics)."""
    from evaluation.clinical import point_metrics

    preds = {r["exam_id"]: {**r["pred"], "findings": {**r["pred"]["findings"], "U": {}}}
             for r in read_jsonl(predictions)}
    ids = [i for i in refs if i in preds]
    m = point_metrics([preds[i] for i in ids], [refs[i] for i in ids])
    return {k: m[k] for k in ("birads_f1", "birads_acc", "density_f1", "finding_f1")}


def _sample_figure(out: Path, exam_ids: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache_dir = out / "cache"
    rows = [r for r in read_jsonl(cache_dir / "manifest.jsonl") if r["exam_id"] in exam_ids]
    fig, axes = plt.subplots(len(rows), 4, figsize=(6, 3.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, view in enumerate(("R_CC", "L_CC", "R_MLO", "L_MLO")):
            ax = axes[r][c]
            if row["cache"].get(view):
                ax.imshow(load_cached(cache_dir, row["cache"][view]), cmap="gray")
            ax.set_title(f"{row['exam_id'][-6:]} {view}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, out / "samples.png", dpi=80)
    return "samples.png"


def index_html(out: Path, summary: dict, report: dict) -> str:
    gen = {r["id"]: r["text"] for r in read_jsonl(out / "generated.jsonl")}
    ref = {r["id"]: r["text"] for r in read_jsonl(out / "references.jsonl")}
    ids = [i for i in gen if i in ref][:3]
    _sample_figure(out, ids)
    table = "".join(f"<tr><td>{k}</td><td>{'n/a' if v is None else f'{v:.3f}'}</td></tr>"
                    for k, v in summary["metrics"].items())
    samples = "".join(f"<h3>{html.escape(i)}</h3><p><b>generated</b>: {html.escape(gen[i])}</p>"
                      f"<p><b>reference</b>: {html.escape(ref[i])}</p>" for i in ids)
    plots = "".join(f"<img src='{p}' style='max-width:45%'>" for p in
                    ("stage1/learning_curve.png", "stage1/confusion_birads.png",
                     "evaluation/confusion_birads.png", "evaluation/confusion_density.png")
                    if (out / p).exists())
    return ("<!doctype html><meta charset='utf-8'><title>mammorg pipeline</title>"
            "<h1>mammorg pipeline</h1><h2>Test-split metrics (generated vs. reference reports)</h2>"
            f"<table border=1 cellpadding=4>{table}</table><p>Full tables: "
            "<a href='evaluation/index.html'>evaluation</a>, <a href='bundle/README.md'>model card</a></p>"
            f"<h2>Plots</h2>{plots}<h2>Sample exams</h2><img src='samples.png'>{samples}"
            "<h2>mammorg report on a held-out exam (from the bundle)</h2><pre>"
            + html.escape(json.dumps({k: report[k] for k in ("text", "structured", "missing_views",
                                                              "seconds") if k in report}, indent=2))
            + "</pre><h2>Summary</h2><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>")


def run_pipeline(config: str | Path, out: str | Path, overrides: list[str] = ()) -> dict:
    config = Path(config)
    cfg = load_config(config, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "pipeline.yaml")
    return Pipeline(cfg, config.resolve().parent, out).run()


def print_summary(summary: dict, out: str | Path) -> None:
    stage1 = summary["stage1_test_as_report"]
    print("\n| metric (test split vs. reference reports) | generated report | stage-1 labels |")
    print("|---|---|---|")
    for k, v in summary["metrics"].items():
        s1 = stage1.get(k)
        print(f"| {k} | {'n/a' if v is None else f'{v:.3f}'} | {'' if s1 is None else f'{s1:.3f}'} |")
    print(f"\npipeline finished in {summary['seconds']} s; open {out}/index.html")


def demo_main(args: argparse.Namespace) -> None:
    summary = run_pipeline(args.config or DEFAULT_CONFIG, args.out, args.overrides)
    print_summary(summary, args.out)
