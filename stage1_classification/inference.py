"""Stage-1 inference: load a trained run, predict exams, write prediction records and feature tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS, SIDES, VIEWS, most_severe
from mammorg.schema import HeadProbabilities, Labels, Stage1Prediction
from mammorg.training.checkpoint import load_tensors, save_tensors
from mammorg.training.recipe import trained_run
from stage1_classification.config import Stage1Config
from stage1_classification.data import ExamDataset, collate
from stage1_classification.localisation import grounded_findings
from stage1_classification.model import MultiViewClassifier, create_model
from stage1_classification.operating_points import OperatingPoints

WEIGHTS = "model.safetensors"


def load_run(run_dir: str | Path, which: str = "best") -> tuple[Stage1Config, MultiViewClassifier]:
    """The run's config and its trained model (``best``, else the newest intact checkpoint)."""
    cfg, folder = trained_run(run_dir, Stage1Config, "stage-1", which)
    model = create_model(cfg.model)
    missing, unexpected = model.load_state_dict(load_tensors(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        names = ", ".join([*missing, *unexpected][:3])
        raise MammorgError(
            f"{folder / WEIGHTS}: the checkpoint does not match the model of its run's config.yaml ({names}); "
            "it was written by another version or config"
        )
    return cfg, model.eval()


def _per_side(values: torch.Tensor, names: tuple[str, ...], present: dict[str, bool]) -> dict:
    return {s: dict(zip(names, values[i].tolist())) if present[s] else None for i, s in enumerate(SIDES)}


def exam_record(
    exam_id: str,
    density: torch.Tensor,
    birads: torch.Tensor,
    findings: torch.Tensor,
    view_mask: torch.Tensor,
    descriptors: dict[str, torch.Tensor] | None = None,
    points: OperatingPoints | None = None,
) -> Stage1Prediction:
    """One prediction from the probabilities of one exam (``birads`` [2, 9], ``findings`` [2, 7]);
    ``pred`` holds the labels decided at the run's operating points."""
    points = points or OperatingPoints()
    present = {s: bool(view_mask[2 * i : 2 * i + 2].any()) for i, s in enumerate(SIDES)}
    found = points.finding_positive(findings)
    birads_idx, positive = points.birads_labels(birads, found).tolist(), found.tolist()
    side_birads = {s: BIRADS_CLASSES[birads_idx[i]] if present[s] else None for i, s in enumerate(SIDES)}
    side_findings = {
        s: ({f: "pos" if on else "neg" for f, on in zip(FINDINGS, positive[i])} if present[s] else {})
        for i, s in enumerate(SIDES)
    }
    probs = HeadProbabilities(
        dict(zip(DENSITIES, density.tolist())),
        _per_side(birads, BIRADS_CLASSES, present),
        _per_side(findings, FINDINGS, present),
    )
    desc_labels: dict[str, dict[str, str]] = {}
    if descriptors:
        probs.descriptors = {
            s: {name: dict(zip(DESCRIPTORS[name], p[i].tolist())) for name, p in descriptors.items()}
            if present[s]
            else None
            for i, s in enumerate(SIDES)
        }
        desc_labels = {
            s: {name: DESCRIPTORS[name][int(p[i].argmax())] for name, p in descriptors.items()} if present[s] else {}
            for i, s in enumerate(SIDES)
        }
    pred = Labels(
        DENSITIES[int(density.argmax())],
        {**side_birads, "exam": most_severe(list(side_birads.values()))},
        side_findings,
        desc_labels,
    )
    return Stage1Prediction(exam_id, [v for v, m in zip(VIEWS, view_mask.tolist()) if m], probs, pred)


def feature_name(exam_id: str) -> str:
    """A file name for an exam's feature tokens (safe characters, unique by hash)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in exam_id)[:80]
    return f"{safe}-{hashlib.sha1(exam_id.encode()).hexdigest()[:8]}.safetensors"


def save_features(
    path: Path, tokens: torch.Tensor, view_mask: torch.Tensor, heatmaps: torch.Tensor | None = None
) -> None:
    """An exam's feature tokens ``[4, N, D]`` and view mask, and its finding heatmaps
    (probabilities ``[4, F, h, w]``, float16) when the model localises."""
    tensors = {"tokens": tokens, "view_mask": view_mask.to(torch.uint8)}
    if heatmaps is not None:
        tensors["heatmaps"] = heatmaps.to(torch.float16)
    save_tensors(tensors, path)


@torch.no_grad()
def predict_dataset(
    model: MultiViewClassifier,
    ds: ExamDataset,
    batch_size: int = 8,
    features_dir: Path | None = None,
    progress: bool = True,
    points: OperatingPoints | None = None,
    num_workers: int = 0,
) -> list[Stage1Prediction]:
    """Records for every exam of ``ds``; writes feature files when ``features_dir`` is given.
    On a GPU the views load in ``num_workers`` processes into pinned memory and the model runs
    under bf16 autocast (as in training)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    records = []
    geometries = {exam.exam_id: exam.geometry for exam in getattr(ds, "exams", [])}
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers, pin_memory=cuda
    )
    for batch in tqdm(loader, desc="stage1 predict", disable=not progress, leave=False):
        mask = batch["view_mask"]
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batch["images"].to(device, non_blocking=True), mask.to(device, non_blocking=True))
        dens, bir = out["density"].float().softmax(-1).cpu(), out["birads"].float().softmax(-1).cpu()
        find, tokens = out["findings"].float().sigmoid().cpu(), out["tokens"].float().cpu()
        desc = {k[5:]: v.float().softmax(-1).cpu() for k, v in out.items() if k.startswith("desc_")}
        heat = out["heatmaps"].float().sigmoid().cpu() if "heatmaps" in out else None
        for i, exam_id in enumerate(batch["exam_id"]):
            rec = exam_record(exam_id, dens[i], bir[i], find[i], mask[i], {k: v[i] for k, v in desc.items()}, points)
            if heat is not None:
                positive = {s: [f for f, v in rec.pred.findings[s].items() if v == "pos"] for s in SIDES}
                geometry = geometries.get(exam_id, {})
                rec.grounded = grounded_findings(positive, heat[i], batch["images"][i], mask[i], geometry)
            if features_dir is not None:
                name = feature_name(exam_id)
                save_features(features_dir / name, tokens[i], mask[i], None if heat is None else heat[i])
                rec.features = f"{features_dir.name}/{name}"
            records.append(rec)
    return records
