"""``mammorg report --bundle BUNDLE INPUT... [--json]``: a report for a new exam, fully offline.

INPUT is an exam folder, up to four image files (DICOM or 16-bit PNG), or a manifest (``.jsonl``,
batch mode). A missing view is reported and the output is flagged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.parser import parse_report
from mammorg.bundle import Bundle, load_bundle
from mammorg.io import MammorgError, read_jsonl, write_jsonl_atomic
from mammorg.labels import VIEWS
from mammorg.preprocess import from_uint16, preprocess_file, resolve_view_path, to_uint16
from mammorg.privacy import hash_id

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png")


def exam_files(inputs: list[str]) -> list[Path]:
    """Image files of one exam: a folder's images, or the files given."""
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        files = sorted(p for p in paths[0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MammorgError(f"{paths[0]}: no DICOM or PNG files in this folder")
        return files
    for p in paths:
        if not p.is_file():
            raise MammorgError(f"{p}: file not found")
    return paths


def load_views(files: list[Path], bundle: Bundle) -> dict[str, np.ndarray]:
    """Preprocess each file like the training cache (same spec, same uint16 quantisation)."""
    if len(files) > 4:
        raise MammorgError(f"{files[0].parent}: {len(files)} images; an exam has at most four views")
    views: dict[str, np.ndarray] = {}
    sources: dict[str, Path] = {}
    for path in files:
        img, view, _ = preprocess_file(path, bundle.spec)
        if view in views:
            raise MammorgError(f"{path}: a second {view} view (first: {sources[view]})")
        views[view], sources[view] = from_uint16(to_uint16(img)), path
    return views


@torch.no_grad()
def report_exam(bundle: Bundle, views: dict[str, np.ndarray], max_new_tokens: int | None = None) -> dict:
    """Stage 1 → knowledge + visual tokens → stage 2 → narrative and structured report."""
    from stage1_classification.inference import exam_record
    from stage2_sft.data import collate
    from stage2_sft.constrained import assessment_tokens
    from stage2_sft.generate import generation_kwargs, make_builder, with_assessment
    from stage2_sft.knowledge import state_from_prediction

    if not views:
        raise MammorgError("an exam with no usable view cannot be reported")
    shape = next(iter(views.values())).shape
    images = torch.stack([torch.from_numpy(views[v]) if v in views else torch.zeros(shape)
                          for v in VIEWS]).reshape(1, 4, 1, *shape)
    mask = torch.tensor([[v in views for v in VIEWS]])
    out = bundle.stage1(images, mask)
    descriptors = {k[5:]: v[0].softmax(-1) for k, v in out.items() if k.startswith("desc_")}
    record = exam_record("exam", out["density"][0].softmax(-1), out["birads"][0].softmax(-1),
                         out["findings"][0].sigmoid(), mask[0], descriptors, bundle.stage1_points)
    cfg, tok = bundle.stage2_cfg, bundle.tokenizer
    builder = make_builder(cfg, tok)
    state = state_from_prediction(record)  # at inference the knowledge is always predicted
    sample = {"exam_id": "exam", "prompt": builder.prompt_ids(mask[0].tolist(), state), "report": [],
              "knowledge": state, "visual": out["tokens"][0][mask[0]]}
    if not cfg.visual.enabled:
        sample.pop("visual")
    batch = collate([sample], tok.pad_token_id, for_generation=True)
    assessment = cfg.generate.get("assessment", "free")
    tokens = assessment_tokens(assessment, tok, builder.plan)
    kwargs = with_assessment(generation_kwargs(cfg, tok), assessment, tokens,
                             batch["knowledge"]["birads_label"])
    if max_new_tokens:
        kwargs["max_new_tokens"] = max_new_tokens
    ids = bundle.generator.generate(batch["input_ids"], batch["attention_mask"], batch.get("visual"),
                                    batch["knowledge"], **kwargs)[0]
    text = tok.decode(ids, skip_special_tokens=True).strip()
    missing = [v for v in VIEWS if v not in views]
    return {"text": text, "structured": parse_report(text), "stage1": {"probs": record["probs"],
            "pred": record["pred"]}, "views": sorted(views), "missing_views": missing,
            "flags": [f"generated without view(s): {', '.join(missing)}"] if missing else []}


def _batch(bundle: Bundle, manifest: Path, out: Path | None) -> list[dict]:
    rows = []
    for exam in read_jsonl(manifest):
        files = [resolve_view_path(manifest.parent, p) for p in exam["views"].values() if p]
        try:
            rows.append({"id": exam["exam_id"], **report_exam(bundle, load_views(files, bundle))})
        except MammorgError as exc:  # one bad exam does not stop the batch
            rows.append({"id": exam["exam_id"], "error": str(exc)})
            print(f"mammorg: {exam['exam_id']}: {exc}", file=sys.stderr)
    if out:
        write_jsonl_atomic(out, rows)
    return rows


def report_main(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle, trust_pickle=args.trust_pickle)
    if len(args.inputs) == 1 and args.inputs[0].endswith(".jsonl"):
        rows = _batch(bundle, Path(args.inputs[0]), Path(args.out) if args.out else None)
        if not args.out:
            for row in rows:
                print(json.dumps(row))
        return
    t0 = time.perf_counter()
    result = report_exam(bundle, load_views(exam_files(args.inputs), bundle))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["exam"] = hash_id("|".join(sorted(args.inputs)))[:12]
    for flag in result["flags"]:
        print(f"WARNING: {flag}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else result["text"])
