"""``mammorg ablate --config ablations/<name>``: clinical-efficacy ablations.

Each grid row names stage-1 and stage-2 overrides, and may name a stage-2 config of its own (a
name, or a path relative to the ablation's file: tiny and pretrained decoders in one table);
every row runs for every seed in its own folder (a run whose evaluation exists is not redone).
Data and each distinct stage-1 setting are prepared once. Writes ``table.csv``, ``table.md``
(mean ± 95% t-interval over seeds, paired bootstrap on the pooled test exams against the
baseline row, or against the row a row names as ``versus``) and ``ablation.png``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from evaluation.clinical import paired_bootstrap
from evaluation.evaluate import paired_scores
from mammorg.app.config import AblationConfig, PipelineConfig
from mammorg.app.pipeline import Pipeline, parsed_references, stage1_as_report_metrics, stage1_reports
from mammorg.config import load_config, resolve_config, save_config
from mammorg.io import MammorgError, atomic_path, read_jsonl, write_text_atomic
from mammorg.plotting import pyplot, save_figure
from mammorg.schema import StructuredReport
from stage2_sft.reporter import GeneratedReport

METRICS = ("birads_f1", "birads_acc", "density_f1", "finding_f1", "bleu_4", "rouge_l", "cider")


def _stage1_key(overrides: list[str]) -> str:
    return "stage1-" + hashlib.sha1(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RowPlan:
    """What one grid row trains: its stage-1 run (shared by rows with the same stage-1
    overrides), its stage-2 overrides before the seed, and its own stage-2 config file (or
    ``None``: the pipeline's)."""

    stage1_run: str
    stage1: list[str]
    stage2: list[str]
    stage2_file: str | None


def row_plans(cfg: AblationConfig, pipe: Pipeline, config_dir: Path) -> dict[str, RowPlan]:
    """Every row's plan, its stage-1 and stage-2 configs loaded strictly with its overrides (first
    seed), so that a wrong config name, key or value is a one-line error naming the row before
    any data is written or any model trained. A row's ``stage2_config`` is a name or a path
    relative to the ablation's file (``config_dir``)."""
    plans = {}
    for name, row in cfg.grid.items():
        s1 = [*pipe.cfg.stage1.overrides, *row.stage1]
        own = str(resolve_config(row.stage2_config, relative_to=config_dir).resolve()) if row.stage2_config else None
        plan = RowPlan(_stage1_key(s1), s1, [*pipe.cfg.stage2.overrides, *row.stage2], own)
        try:
            pipe.stage1_config(plan.stage1_run, plan.stage1)
            pipe.stage2_config(
                _run(name, cfg.seeds[0]) + "stage2", plan.stage1_run, _seeded(plan, cfg.seeds[0]), plan.stage2_file
            )
        except MammorgError as exc:
            raise MammorgError(f"ablation row {name!r}: {exc}") from exc
        plans[name] = plan
    return plans


def _run(name: str, seed: int) -> str:
    return f"runs/{name}/seed{seed}/"


def _seeded(plan: RowPlan, seed: int) -> list[str]:
    return [*plan.stage2, f"seed={seed}"]


def run_grid(cfg: AblationConfig, config_dir: Path) -> Path:
    out = Path(cfg.out)
    pipe_path = resolve_config(cfg.pipeline, relative_to=config_dir).resolve()
    pipe = Pipeline(load_config(pipe_path, PipelineConfig), pipe_path.parent, out)
    plans = row_plans(cfg, pipe, config_dir)  # checked before any work starts
    out.mkdir(parents=True, exist_ok=True)
    save_config(pipe.cfg, out, "pipeline.yaml")
    pipe.prepare_data()
    for name, plan in plans.items():
        pipe.train_stage1(plan.stage1_run, plan.stage1)
        for seed in cfg.seeds:
            run = _run(name, seed)
            if (out / run / "evaluation" / "metrics.json").exists():
                print(f"[ablate] {name} seed {seed}: done before, skipped")
                continue
            pipe.train_stage2(run + "stage2", plan.stage1_run, _seeded(plan, seed), plan.stage2_file)
            pipe.generate_and_evaluate(run + "stage2", run)
    return write_table(cfg, out)


def _mean_ci(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan"), float("nan"))
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def _pooled_scores(
    out: Path, name: str, seeds: list[int], refs: dict[str, StructuredReport], ref_texts: dict[str, str]
) -> dict[str, np.ndarray]:
    """A row's per-exam scores (clinical, ROUGE-L, CIDEr), its seeds one after another."""
    pooled: dict[str, list] = {}
    for seed in seeds:
        gen = GeneratedReport.read(out / f"runs/{name}/seed{seed}/generated.jsonl")
        scores = paired_scores(
            [g.text for g in gen],
            [g.structured for g in gen],
            [ref_texts[g.exam_id] for g in gen],
            [refs[g.exam_id] for g in gen],
        )
        for k, v in scores.items():
            pooled.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in pooled.items()}


def cfg_pipeline_stage1(out: Path) -> list[str]:
    """The pipeline's base stage-1 overrides, as saved by ``run_grid``."""
    return list(load_config(out / "pipeline.yaml", PipelineConfig).stage1.overrides)


def write_table(cfg: AblationConfig, out: Path) -> Path:
    seeds = list(cfg.seeds)
    refs = parsed_references(out)
    ref_texts = {r["id"]: r["text"] for r in read_jsonl(out / "references.jsonl")}
    pooled = {name: _pooled_scores(out, name, seeds, refs, ref_texts) for name in cfg.grid}
    rows = []
    for name, spec in cfg.grid.items():
        per_seed = [json.loads((out / f"runs/{name}/seed{s}/evaluation/metrics.json").read_text()) for s in seeds]
        row: dict = {"row": name, "seeds": len(seeds), "versus": spec.versus or cfg.baseline}
        s1_run = _stage1_key([*cfg_pipeline_stage1(out), *spec.stage1])
        s1 = stage1_as_report_metrics(refs, stage1_reports(out / s1_run / "predictions.jsonl"))
        row.update({f"stage1_{k}": v for k, v in s1.items()})
        for key in METRICS:
            row[key], row[f"{key}_ci95"] = _mean_ci([m.get(key) for m in per_seed])
        if name != row["versus"]:
            test = paired_bootstrap(pooled[name], pooled[row["versus"]], n=cfg.bootstrap)
            for key, res in test.items():
                row[f"{key}_delta"], row[f"{key}_p"] = res["delta"], res["p_value"]
        rows.append(row)
    table = pd.DataFrame(rows)
    with atomic_path(out / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text_atomic(out / "table.md", markdown(table))
    bar_plot(table, out / "ablation.png")
    print(markdown(table))
    return out / "table.md"


def markdown(table: pd.DataFrame) -> str:
    """The table's main columns; p: paired bootstrap of exam BI-RADS macro-F1 against ``versus``."""
    keys = ("birads_f1", "density_f1", "finding_f1", "bleu_4", "rouge_l", "cider")
    head = "| row | " + " | ".join(keys) + " | p (BI-RADS F1) vs | stage-1 labels: birads_f1 |\n"
    head += "|---" * (len(keys) + 3) + "|\n"
    fmt = lambda m, h: f"{m:.3f}" + ("" if np.isnan(h) else f" ± {h:.3f}")
    lines = []
    for _, r in table.iterrows():
        p = r.get("birads_f1_p")
        p_text = (
            "baseline"
            if r["row"] == r["versus"]
            else ("n/a" if p is None or pd.isna(p) else f"{p:.3f}") + f" vs {r['versus']}"
        )
        lines.append(
            f"| {r['row']} | "
            + " | ".join(fmt(r[k], r[f"{k}_ci95"]) for k in keys)
            + f" | {p_text} | {r['stage1_birads_f1']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def bar_plot(table: pd.DataFrame, path: Path) -> None:
    keys = ("birads_f1", "density_f1", "finding_f1")
    x = np.arange(len(table))
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.2 * len(table), 3.2))
    for i, key in enumerate(keys):
        err = np.nan_to_num(table[f"{key}_ci95"].to_numpy(dtype=float))
        ax.bar(x + (i - 1) * 0.27, table[key], 0.27, yerr=err, label=key, capsize=2)
    ax.set_xticks(x, table["row"], rotation=20)
    ax.set_ylabel("test split (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def ablate(config: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run (or complete) an ablation grid; returns its ``table.md``."""
    path = resolve_config(config)
    return run_grid(load_config(path, AblationConfig, overrides), path.resolve().parent)
