"""Export bundle (DESIGN.md §8): self-contained, hashed, loadable offline without the run folders.

``mammorg export --run STAGE2_RUN --out BUNDLE [--merge-lora]``::

    BUNDLE/stage1/{model.safetensors, config.yaml}   multi-view classifier
    BUNDLE/tokenizer/                                 tokenizer with terminology tokens
    BUNDLE/decoder/ (+ base_decoder/ for an adapter)  HF model folder or PEFT adapter folder
    BUNDLE/extras.safetensors, stage2_config.yaml     projector / soft knowledge, stage-2 config
    BUNDLE/preprocess.json, label_maps.json           preprocessing spec, label spaces
    BUNDLE/metadata.json, README.md                   versions, inputs/outputs, sha256, model card
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mammorg.config import load_config
from mammorg.io import MammorgError, read_jsonl, write_json_atomic, write_text_atomic
from mammorg.labels import BIRADS_CLASSES, DENSITIES, FINDINGS, VIEWS
from mammorg.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from stage1_classification.operating_points import OperatingPoints

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PACKAGES = ("mammorg", "torch", "timm", "transformers", "peft", "safetensors", "tokenizers",
            "pydicom", "numpy")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _stage1_run(cfg: DictConfig, override: str | None) -> Path:
    run = Path(override or cfg.data.get("stage1_run") or "")
    if not str(run) or not (run / "config.yaml").exists():
        raise MammorgError(f"{run or '(unset)'}: stage-1 run folder not found (set data.stage1_run "
                           "in the stage-2 config or pass --stage1-run)")
    return run


def _metrics_summary(run: Path) -> dict:
    log = run / "metrics.jsonl"
    rows = read_jsonl(log) if log.exists() else []
    return rows[-1] if rows else {}


def export(run_dir: str | Path, out: str | Path, merge_lora: bool = False,
           stage1_run: str | None = None, eval_metrics: str | None = None) -> Path:
    """Write a bundle into a temporary folder, hash every file, then rename it into place."""
    from stage1_classification.inference import load_run as load_stage1
    from stage1_classification.operating_points import OperatingPoints
    from stage2_sft.generate import load_run as load_stage2

    run_dir, out = Path(run_dir), Path(out)
    cfg, model, tok = load_stage2(run_dir)
    s1_dir = _stage1_run(cfg, stage1_run)
    s1_cfg, _ = load_stage1(s1_dir)
    spec_file = Path(s1_cfg.data.cache_manifest).parent / "spec.json"
    if not spec_file.exists():
        raise MammorgError(f"{spec_file}: preprocessing spec of the stage-1 data not found")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "stage1").mkdir(parents=True)
    best = s1_dir / "checkpoints" / "best" / "model.safetensors"
    shutil.copy2(best if best.exists() else s1_dir / "checkpoints/last/model.safetensors",
                 tmp / "stage1" / "model.safetensors")
    shutil.copy2(s1_dir / "config.yaml", tmp / "stage1" / "config.yaml")
    OperatingPoints.load(s1_dir).save(tmp / "stage1")
    _export_generator(model, tok, run_dir, tmp, merge_lora)
    shutil.copy2(run_dir / "config.yaml", tmp / "stage2_config.yaml")
    shutil.copy2(spec_file, tmp / "preprocess.json")
    write_json_atomic(tmp / "label_maps.json", {"views": VIEWS, "density": DENSITIES,
                                                "birads": BIRADS_CLASSES, "findings": FINDINGS})
    metrics = json.loads(Path(eval_metrics).read_text()) if eval_metrics else {}
    write_text_atomic(tmp / "README.md", model_card(cfg, s1_cfg, metrics, merge_lora))
    write_metadata(tmp, cfg, s1_dir, run_dir, metrics)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _export_generator(model, tok, run_dir: Path, tmp: Path, merge_lora: bool) -> None:
    from safetensors.torch import save_file

    tok.save_pretrained(str(tmp / "tokenizer"))
    decoder = model.decoder
    is_adapter = hasattr(decoder, "peft_config")
    if is_adapter and merge_lora:
        decoder = decoder.merge_and_unload()
        is_adapter = False
    decoder.save_pretrained(str(tmp / "decoder"), safe_serialization=True)
    if is_adapter:
        shutil.copytree(run_dir / "base_decoder", tmp / "base_decoder")
    save_file({k: v.contiguous() for k, v in model.extra_state_dict().items()},
              str(tmp / "extras.safetensors"))


def write_metadata(bundle: Path, cfg: DictConfig, s1_dir: Path, s2_dir: Path, metrics: dict) -> None:
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "metadata.json")
    meta = {"format": "mammorg-bundle/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "inputs": {"views": list(VIEWS), "image": "DICOM (MG) or 16-bit PNG, one per view",
                       "preprocess": json.loads((bundle / "preprocess.json").read_text())},
            "outputs": {"text": "narrative BI-RADS report",
                        "structured": "DESIGN.md section 5 schema", "probabilities": "stage-1 heads"},
            "knowledge": {"mode": cfg.knowledge.mode, "source": cfg.knowledge.source},
            "lora_adapter": (bundle / "decoder" / "adapter_config.json").exists(),
            "runs": {"stage1": s1_dir.name, "stage2": s2_dir.name},
            "metrics": metrics.get("summary", {k: metrics[k] for k in metrics
                                               if isinstance(metrics[k], (int, float))}),
            "sha256": {str(p.relative_to(bundle)): sha256(p) for p in files}}
    write_json_atomic(bundle / "metadata.json", meta)


def model_card(cfg: DictConfig, s1_cfg: DictConfig, metrics: dict, merged: bool) -> str:
    rows = "".join(f"| {k} | {metrics[k]:.3f} |\n" for k in
                   ("birads_f1", "birads_acc", "density_f1", "finding_f1", "bleu_4", "rouge_l", "cider")
                   if isinstance(metrics.get(k), (int, float))) or "| (none recorded) | |\n"
    decoder = cfg.decoder.name_or_path or f"Llama-style decoder trained from scratch {dict(cfg.decoder.from_config)}"
    return f"""# mammorg report generator (bundle)

Two-stage mammography report generator. Stage 1: `{s1_cfg.model.backbone}` multi-view classifier
(density, BI-RADS per breast, findings per breast). Stage 2: {decoder}
{"(LoRA merged)" if merged else ("with a LoRA adapter" if cfg.lora.enabled else "(full fine-tune)")},
knowledge tokens `{cfg.knowledge.mode}` from `{cfg.knowledge.source}` stage-1 outputs, terminology
tokens {"on" if cfg.terminology.atomic_terms else "off"}.

## Use

    mammorg report --bundle THIS_FOLDER EXAM_FOLDER_OR_FOUR_DICOMS [--json]

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


@dataclass
class Bundle:
    folder: Path
    stage1: object
    generator: object
    tokenizer: object
    spec: PreprocessSpec
    stage2_cfg: DictConfig
    metadata: dict
    stage1_points: OperatingPoints


def verify(folder: Path, trust_pickle: bool = False) -> dict:
    """Check every file's sha256 against ``metadata.json``; refuse unlisted and pickle files."""
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise MammorgError(f"{folder}: not a mammorg bundle (no metadata.json)")
    meta = json.loads(meta_path.read_text())
    listed = meta.get("sha256", {})
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p == meta_path:
            continue
        rel = str(p.relative_to(folder))
        if p.suffix.lower() in PICKLE_SUFFIXES and not trust_pickle:
            raise MammorgError(f"{p}: pickle file in bundle refused (pass trust_pickle to allow)")
        if rel not in listed:
            raise MammorgError(f"{p}: file not listed in metadata.json (bundle tampered?)")
        if sha256(p) != listed[rel]:
            raise MammorgError(f"{p}: sha256 mismatch (bundle tampered or corrupted)")
    missing = [rel for rel in listed if not (folder / rel).is_file()]
    if missing:
        raise MammorgError(f"{folder / missing[0]}: listed in metadata.json but missing")
    return meta


def load_bundle(folder: str | Path, trust_pickle: bool = False, device: str = "cpu") -> Bundle:
    """Verify and load a bundle: stage-1 model, generator, tokenizer, preprocessing spec."""
    from safetensors.torch import load_file
    from stage1_classification.model import create_model
    from stage1_classification.operating_points import OperatingPoints
    from stage2_sft.assembly import load_generator

    folder = Path(folder)
    meta = verify(folder, trust_pickle)
    s1_cfg = load_config(folder / "stage1" / "config.yaml")
    s1_cfg.model.pretrained_path = None  # the bundle's own weights replace any initialisation
    stage1 = create_model(s1_cfg.model)
    stage1.load_state_dict(load_file(str(folder / "stage1" / "model.safetensors")))
    s2_cfg = load_config(folder / "stage2_config.yaml")
    generator, tok = load_generator(folder, s2_cfg, s2_cfg.visual.dim)
    spec = PreprocessSpec(**json.loads((folder / "preprocess.json").read_text()))
    return Bundle(folder, stage1.eval().to(device), generator.to(device), tok, spec, s2_cfg, meta,
                  OperatingPoints.load(folder / "stage1"))


def export_main(args: argparse.Namespace) -> None:
    out = export(args.run, args.out, args.merge_lora, args.stage1_run, args.metrics)
    meta = json.loads((out / "metadata.json").read_text())
    print(json.dumps({"bundle": str(out), "files": len(meta["sha256"]),
                      "lora_adapter": meta["lora_adapter"]}))
