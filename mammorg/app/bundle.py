"""Export bundle: self-contained, hashed, loadable offline without the run folders.

``mammorg export --run STAGE2_RUN --out BUNDLE [--merge-lora]``::

    BUNDLE/stage1/{model.safetensors, config.yaml, operating_points.json}   multi-view classifier
    BUNDLE/generator.json, decoder/ (+ base_decoder/ for an adapter)          report decoder
    BUNDLE/tokenizer/, extras.safetensors, stage2_config.yaml                 tokenizer, projector, config
    BUNDLE/preprocess.json, label_maps.json                                   preprocessing spec, label spaces
    BUNDLE/metadata.json, README.md                                           versions, sha256, model card

The bundle's top level is a generator folder (``ReportGenerator.from_pretrained(BUNDLE)``).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mammorg.config import load_config, save_config
from mammorg.io import MammorgError, sha256_file, write_json_atomic, write_text_atomic
from mammorg.labels import BIRADS_CLASSES, DENSITIES, FINDINGS, VIEWS
from mammorg.preprocess import PreprocessSpec
from mammorg.training.checkpoint import load_tensors, save_tensors
from stage1_classification.config import Stage1Config
from stage1_classification.inference import WEIGHTS
from stage1_classification.inference import load_run as load_stage1
from stage1_classification.model import MultiViewClassifier, create_model
from stage1_classification.operating_points import OperatingPoints
from stage2_sft.config import Stage2Config
from stage2_sft.model import ReportGenerator
from stage2_sft.reporter import Reporter
from stage2_sft.reporter import load_run as load_stage2

FORMAT = "mammorg-bundle/2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PACKAGES = (
    "mammorg",
    "torch",
    "timm",
    "transformers",
    "peft",
    "safetensors",
    "tokenizers",
    "pydicom",
    "numpy",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _stage1_run(cfg: Stage2Config, override: str | Path | None) -> Path:
    run = Path(override or cfg.data.stage1_run or "")
    if not str(run) or not (run / "config.yaml").exists():
        raise MammorgError(
            f"{run or '(unset)'}: stage-1 run folder not found (set data.stage1_run "
            "in the stage-2 config or pass --stage1-run)"
        )
    return run


def export(
    run_dir: str | Path,
    out: str | Path,
    merge_lora: bool = False,
    stage1_run: str | Path | None = None,
    eval_metrics: str | Path | None = None,
) -> Path:
    """Write a bundle into a temporary folder, hash every file, then rename it into place."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, generator, tok = load_stage2(run_dir)
    s1_dir = _stage1_run(cfg, stage1_run)
    s1_cfg, s1_model = load_stage1(s1_dir)
    spec_file = Path(s1_cfg.data.cache_manifest).parent / "spec.json"
    if not spec_file.exists():
        raise MammorgError(f"{spec_file}: preprocessing spec of the stage-1 data not found")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "stage1").mkdir(parents=True)
    save_tensors(s1_model.state_dict(), tmp / "stage1" / WEIGHTS)
    save_config(s1_cfg, tmp / "stage1")
    OperatingPoints.load(s1_dir).save(tmp / "stage1")
    generator.save_pretrained(tmp, tokenizer=tok, base=run_dir / "base_decoder", merge_lora=merge_lora)
    save_config(cfg, tmp, "stage2_config.yaml")
    shutil.copy2(spec_file, tmp / "preprocess.json")
    write_json_atomic(
        tmp / "label_maps.json",
        {"views": VIEWS, "density": DENSITIES, "birads": BIRADS_CLASSES, "findings": FINDINGS},
    )
    metrics = json.loads(Path(eval_metrics).read_text()) if eval_metrics else {}
    write_text_atomic(tmp / "README.md", model_card(cfg, s1_cfg, metrics, merge_lora))
    write_metadata(tmp, cfg, s1_dir, run_dir, metrics)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_metadata(bundle: Path, cfg: Stage2Config, s1_dir: Path, s2_dir: Path, metrics: dict) -> None:
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "metadata.json")
    scalars = metrics.get("summary") or {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    meta = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "inputs": {
            "views": list(VIEWS),
            "image": "DICOM (MG) or 16-bit PNG, one per view",
            "preprocess": json.loads((bundle / "preprocess.json").read_text()),
        },
        "outputs": {
            "text": "narrative BI-RADS report",
            "structured": "docs/design.md section 5",
            "probabilities": "stage-1 heads",
        },
        "knowledge": {"mode": cfg.knowledge.mode, "source": cfg.knowledge.source},
        "lora_adapter": (bundle / "decoder" / "adapter_config.json").exists(),
        "runs": {"stage1": s1_dir.name, "stage2": s2_dir.name},
        "metrics": scalars,
        "sha256": {str(p.relative_to(bundle)): sha256_file(p) for p in files},
    }
    write_json_atomic(bundle / "metadata.json", meta)


def rehash(bundle: Path) -> None:
    """Record the sha256 of every file again (after a file of the bundle was rewritten)."""
    meta = json.loads((bundle / "metadata.json").read_text())
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "metadata.json")
    meta["sha256"] = {str(p.relative_to(bundle)): sha256_file(p) for p in files}
    write_json_atomic(bundle / "metadata.json", meta)


def model_card(cfg: Stage2Config, s1_cfg: Stage1Config, metrics: dict, merged: bool) -> str:
    rows = (
        "".join(
            f"| {k} | {metrics[k]:.3f} |\n"
            for k in ("birads_f1", "birads_acc", "density_f1", "finding_f1", "bleu_4", "rouge_l", "cider")
            if isinstance(metrics.get(k), (int, float))
        )
        or "| (none recorded) | |\n"
    )
    decoder = cfg.decoder.name_or_path or f"Llama-style decoder trained from scratch {dict(cfg.decoder.from_config)}"
    tuning = "(LoRA merged)" if merged else ("with a LoRA adapter" if cfg.lora.enabled else "(full fine-tune)")
    return f"""# mammorg report generator (bundle)

Two-stage mammography report generator. Stage 1: `{s1_cfg.model.backbone}` multi-view classifier
(density, BI-RADS per breast, findings per breast). Stage 2: {decoder}
{tuning}, knowledge tokens `{cfg.knowledge.mode}` from `{cfg.knowledge.source}` stage-1 outputs,
terminology tokens {"on" if cfg.terminology.atomic_terms else "off"}, assessment `{cfg.generate.assessment}`.

## Use

    mammorg report --bundle THIS_FOLDER EXAM_FOLDER_OR_FOUR_DICOMS [--json]
    mammorg serve --bundle THIS_FOLDER

or in Python: `mammorg.app.reporting.ExamReporter.load("THIS_FOLDER").report_files([...])`.
Loading checks the sha256 of every file against `metadata.json` and refuses pickle files.

## Metrics (test split of the data it was trained on)

| metric | value |
|---|---|
{rows}
## Intended use and limitations

Research use only; not a medical device. A model trained on synthetic exams (the embedded
default) has never seen a real mammogram and must not be used on patients. Reports must be read
by a radiologist. Performance on other vendors, populations or views than the training data is
unknown; a missing view is flagged in the output.
"""


def verify(folder: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Check every file's sha256 against ``metadata.json``; refuse unlisted and pickle files."""
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise MammorgError(f"{folder}: not a mammorg bundle (no metadata.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise MammorgError(
            f"{meta_path}: bundle format {meta.get('format')!r}; this version reads {FORMAT} (export the run again)"
        )
    listed = meta.get("sha256", {})
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p == meta_path:
            continue
        rel = str(p.relative_to(folder))
        if p.suffix.lower() in PICKLE_SUFFIXES and not trust_pickle:
            raise MammorgError(f"{p}: pickle file in bundle refused (pass trust_pickle to allow)")
        if rel not in listed:
            raise MammorgError(f"{p}: file not listed in metadata.json (bundle tampered?)")
        if sha256_file(p) != listed[rel]:
            raise MammorgError(f"{p}: sha256 mismatch (bundle tampered or corrupted)")
    missing = [rel for rel in listed if not (folder / rel).is_file()]
    if missing:
        raise MammorgError(f"{folder / missing[0]}: listed in metadata.json but missing")
    return meta


@dataclass
class Bundle:
    """A verified, loaded bundle: stage 1 with its operating points, the reporter, the spec."""

    folder: Path
    stage1: MultiViewClassifier
    stage1_points: OperatingPoints
    reporter: Reporter
    stage2_cfg: Stage2Config
    spec: PreprocessSpec
    metadata: dict[str, Any]


def load_spec(folder: str | Path) -> PreprocessSpec:
    """A verified bundle's preprocessing spec alone (what a service front needs, no model)."""
    folder = Path(folder)
    verify(folder)
    return _spec(folder)


def _spec(folder: Path) -> PreprocessSpec:
    return PreprocessSpec(**json.loads((folder / "preprocess.json").read_text()))


def load_bundle(folder: str | Path, trust_pickle: bool = False, device: str = "cpu") -> Bundle:
    """Verify and load a bundle: stage-1 model, generator, tokenizer, preprocessing spec."""
    folder = Path(folder)
    meta = verify(folder, trust_pickle)
    s1_cfg = load_config(folder / "stage1" / "config.yaml", Stage1Config, ["model.pretrained_path=null"])
    stage1 = create_model(s1_cfg.model)
    stage1.load_state_dict(load_tensors(folder / "stage1" / WEIGHTS))
    s2_cfg = load_config(folder / "stage2_config.yaml", Stage2Config)
    generator, tok = ReportGenerator.from_pretrained(folder)
    spec = _spec(folder)
    reporter = Reporter.from_config(s2_cfg, generator, tok, torch.device(device))
    return Bundle(
        folder,
        stage1.eval().to(device),
        OperatingPoints.load(folder / "stage1"),
        reporter,
        s2_cfg,
        spec,
        meta,
    )
