"""The whole pipeline from one config (``mammorg demo``; ``mammorg demo --config pipeline/tiny``).

synthesise -> ingest -> preprocess -> stage-1 train -> predict (out-of-fold) -> stage-2 train ->
generate -> evaluate -> export -> report on a held-out exam -> ``index.html``. Every step calls
the library (the functions behind the commands of the same names); finished steps are reused
(the training recipes resume, the caches skip what they hold).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from evaluation.clinical import point_metrics
from evaluation.evaluate import evaluate_files
from evaluation.parser import parse_report
from mammorg.app.bundle import export
from mammorg.app.config import PipelineConfig
from mammorg.app.reporting import add_example
from mammorg.app.results import write_index
from mammorg.config import load_config, resolve_config, save_config
from mammorg.data.ingest import ingest
from mammorg.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from mammorg.preprocess import PreprocessSpec, preprocess_manifest
from mammorg.schema import StructuredReport, read_manifest, read_predictions
from mammorg.synth.writer import SynthSettings, synthesise
from stage1_classification.config import Stage1Config
from stage1_classification.predict import oof_folds, predict
from stage1_classification.train import train as train_stage1_run
from stage2_sft.config import Stage2Config
from stage2_sft.generate import generate
from stage2_sft.train import train as train_stage2_run

T = TypeVar("T")
SUMMARY_KEYS = (
    "birads_f1",
    "birads_acc",
    "density_f1",
    "finding_f1",
    "bleu_1",
    "bleu_4",
    "rouge_l",
    "cider",
    "meteor",
)


class Pipeline:
    """Runs the steps of a pipeline config into one output folder."""

    def __init__(self, cfg: PipelineConfig, config_dir: Path, out: Path):
        self.cfg, self.config_dir, self.out = cfg, config_dir, out
        self.timings: dict[str, float] = {}

    def path(self, rel: str) -> Path:
        return self.out / rel

    def step(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one step, timed; its errors stop the pipeline with their own one-line message."""
        print(f"[pipeline] {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 1)
        return result

    @property
    def cache_manifest(self) -> Path:
        return self.path("cache/manifest.jsonl")

    def run(self) -> dict:
        self.prepare_data()
        self.train_stage1("stage1", self.cfg.stage1.overrides)
        self.train_stage2("stage2", "stage1", self.cfg.stage2.overrides)
        self.generate_and_evaluate("stage2", "")
        self.step(
            "export",
            export,
            self.path("stage2"),
            self.path("bundle"),
            self.cfg.export.merge_lora,
            None,
            self.path("evaluation/metrics.json"),
        )
        exam_id, folder = self.held_out_exam()
        report = self.step("report", add_example, self.path("bundle"), [folder])
        write_json_atomic(self.path("report_example.json"), {**report.to_json(), "exam_id": exam_id})
        return self.summary(report.seconds)

    def prepare_data(self) -> None:
        """synthesise -> ingest -> preprocess (each reused when done) and the test references."""
        c = self.cfg
        if not self.path("synth/manifest.jsonl").exists():
            settings = SynthSettings(
                exams=c.synth.exams,
                seed=c.synth.seed,
                height=c.synth.height,
                width=c.synth.width,
                styles=tuple(c.synth.styles),
                test_fraction=c.synth.test_fraction,
            )
            self.step("synthesise", synthesise, self.path("synth"), settings)
        self.step("ingest", ingest, "vindr", self.path("synth"), self.path("manifest.jsonl"), parse_report)
        spec = PreprocessSpec(height=c.preprocess.height, width=c.preprocess.width)
        self.step(
            "preprocess",
            preprocess_manifest,
            self.path("manifest.jsonl"),
            self.path("cache"),
            spec,
            workers=c.preprocess.workers,
        )
        rows = [
            {"id": e.exam_id, "text": e.report}
            for e in read_manifest(self.cache_manifest)
            if e.split == c.generate.split and e.report
        ]
        write_jsonl_atomic(self.path("references.jsonl"), rows)

    def stage_config(self, ref: str, schema: type[T], overrides: list[str]) -> T:
        return load_config(resolve_config(ref, relative_to=self.config_dir), schema, overrides)

    def stage1_config(self, run: str, overrides: list[str]) -> Stage1Config:
        """The stage-1 config of run folder ``run`` (loaded strictly: a wrong key is an error)."""
        return self.stage_config(
            self.cfg.stage1.config,
            Stage1Config,
            [f"data.cache_manifest={self.cache_manifest}", f"run_dir={self.path(run)}", *overrides],
        )

    def stage2_config(self, run: str, stage1_run: str, overrides: list[str], config: str | None = None) -> Stage2Config:
        """The stage-2 config of run folder ``run`` on ``stage1_run``'s predictions, from the
        pipeline's stage-2 config or ``config`` (a name or a path) instead."""
        return self.stage_config(
            config or self.cfg.stage2.config,
            Stage2Config,
            [
                f"data.manifest={self.cache_manifest}",
                f"run_dir={self.path(run)}",
                f"data.predictions={self.path(stage1_run + '/predictions.jsonl')}",
                f"data.stage1_run={self.path(stage1_run)}",
                *overrides,
            ],
        )

    def train_stage1(self, run: str, overrides: list[str]) -> None:
        """Stage-1 training, then predictions (out-of-fold on the training split) with features."""
        self.step("stage-1 train", train_stage1_run, self.stage1_config(run, overrides))
        predictions = self.path(f"{run}/predictions.jsonl")
        if not predictions.exists() or oof_folds(predictions) != self.cfg.stage1.oof_folds:
            self.step(
                "stage-1 predict",
                predict,
                self.path(run),
                self.cache_manifest,
                predictions,
                self.path(f"{run}/features"),
                self.cfg.stage1.oof_folds,
            )

    def train_stage2(self, run: str, stage1_run: str, overrides: list[str], config: str | None = None) -> None:
        """Stage-2 training with the pipeline's stage-2 config, or ``config`` (a name or a path) instead."""
        self.step("stage-2 train", train_stage2_run, self.stage2_config(run, stage1_run, overrides, config))

    def generate_and_evaluate(self, run: str, prefix: str) -> None:
        """``{prefix}generated.jsonl`` on the test split and ``{prefix}evaluation/``."""
        c = self.cfg
        self.step(
            "generate",
            generate,
            self.path(run),
            self.cache_manifest,
            self.path(f"{prefix}generated.jsonl"),
            split=c.generate.split,
        )
        self.step(
            "evaluate",
            evaluate_files,
            self.path(f"{prefix}generated.jsonl"),
            self.path("references.jsonl"),
            self.path(f"{prefix}evaluation"),
            bootstrap=c.evaluate.bootstrap,
            meteor=c.evaluate.meteor,
        )

    def held_out_exam(self) -> tuple[str, Path]:
        """A test exam's image folder (the synthetic layout keeps one folder per study)."""
        exam = next(e for e in read_manifest(self.cache_manifest) if e.split == self.cfg.generate.split)
        view = exam.present_views[0]
        path = exam.view_path(view, self.cache_manifest.parent)
        assert path is not None
        return exam.exam_id, path.parent

    def summary(self, report_seconds: float) -> dict:
        metrics = json.loads(self.path("evaluation/metrics.json").read_text())
        s1 = read_jsonl(self.path("stage1/metrics.jsonl"))
        best = max(s1, key=lambda r: r["val"].get("score", -1))["val"] if s1 else {}
        stage1 = stage1_reports(self.path("stage1/predictions.jsonl"))
        summary = {
            "generated_test_reports": metrics.get("n"),
            "metrics": {k: metrics.get(k) for k in SUMMARY_KEYS},
            "stage1_val": {k: v for k, v in best.items() if isinstance(v, float)},
            "stage1_test_as_report": stage1_as_report_metrics(parsed_references(self.out), stage1),
            "stage1_agreement": stage1_agreement(self.path("generated.jsonl"), stage1),
            "report_seconds": report_seconds,
            "timings_s": self.timings,
            "seconds": round(sum(self.timings.values()), 1),
        }
        write_json_atomic(self.path("summary.json"), summary)
        write_index(self.out, summary)
        return summary


def parsed_references(out: Path) -> dict[str, StructuredReport]:
    """The test-split reference reports of a pipeline folder, parsed once."""
    return {r["id"]: parse_report(r["text"]) for r in read_jsonl(out / "references.jsonl")}


def stage1_reports(predictions: Path) -> dict[str, StructuredReport]:
    """Stage 1's labels (at its operating points) of every exam, as structured reports."""
    return {r.exam_id: StructuredReport.from_labels(r.pred) for r in read_predictions(predictions)}


def stage1_as_report_metrics(refs: dict[str, StructuredReport], preds: dict[str, StructuredReport]) -> dict:
    """Stage-1 labels (``stage1_reports``) scored like generated reports (same references, metrics)."""
    ids = [i for i in refs if i in preds]
    m = point_metrics([preds[i] for i in ids], [refs[i] for i in ids])
    return {k: m[k] for k in ("birads_f1", "birads_acc", "density_f1", "finding_f1")}


def stage1_agreement(generated: Path, preds: dict[str, StructuredReport]) -> dict:
    """How faithfully the reports state the knowledge they were given: each generated report
    scored against stage 1's own labels of its exam (``stage1_reports``: exam and per-breast
    category accuracy, density accuracy, side-aware finding F1)."""
    rows = [r for r in read_jsonl(generated) if r["id"] in preds]
    if not rows:
        return {}
    m = point_metrics([StructuredReport.from_json(r["structured"]) for r in rows], [preds[r["id"]] for r in rows])
    keys = {
        "exam_category": "birads_acc",
        "left_category": "birads_L_acc",
        "right_category": "birads_R_acc",
        "density": "density_acc",
        "finding_f1": "finding_f1",
    }
    return {name: m[key] for name, key in keys.items()} | {"n": len(rows)}


def run_pipeline(config: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    path = resolve_config(config)
    cfg = load_config(path, PipelineConfig, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "pipeline.yaml")
    return Pipeline(cfg, path.resolve().parent, out).run()


def summary_table(summary: dict) -> str:
    """The demo's closing table: generated reports beside stage 1's own labels."""
    stage1 = summary["stage1_test_as_report"]
    lines = [
        "| metric (test split vs. reference reports) | generated report | stage-1 labels |",
        "|---|---|---|",
    ]
    for k, v in summary["metrics"].items():
        s1 = stage1.get(k)
        lines.append(f"| {k} | {'n/a' if v is None else f'{v:.3f}'} | {'' if s1 is None else f'{s1:.3f}'} |")
    agree = summary.get("stage1_agreement") or {}
    if agree:
        lines.append("")
        lines.append(
            "reports against stage 1's own labels (the knowledge they were given): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in agree.items() if k != "n")
        )
    return "\n".join(lines)
