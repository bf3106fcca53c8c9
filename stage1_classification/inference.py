"""Stage-1 inference: load a run, predict exams, write prediction records and feature tokens."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from mammorg.checkpoint import load_weights
from mammorg.config import load_config
from mammorg.io import MammorgError, atomic_path
from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS, VIEWS, most_severe
from stage1_classification.data import ExamDataset, collate
from stage1_classification.model import MultiViewClassifier, create_model
from stage1_classification.operating_points import OperatingPoints


def load_run(run_dir: str | Path, which: str = "best") -> tuple[DictConfig, MultiViewClassifier]:
    """The resolved config and the trained model (``best``, falling back to ``last``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise MammorgError(f"{run_dir}: not a stage-1 run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    for name in (which, "last"):
        weights = run_dir / "checkpoints" / name / "model.safetensors"
        if weights.exists():
            model = create_model(cfg.model)
            load_weights(model, weights)
            return cfg, model.eval()
    raise MammorgError(f"{run_dir}: no checkpoint (train first)")


def exam_record(exam_id: str, density: torch.Tensor, birads: torch.Tensor, findings: torch.Tensor,
                view_mask: torch.Tensor, descriptors: dict[str, torch.Tensor] | None = None,
                points: OperatingPoints = OperatingPoints()) -> dict:
    """One prediction line from the probabilities of one exam (``birads`` [2, 9], ``findings`` [2, 7]);
    ``pred`` holds the labels decided at the run's operating points."""
    present = {s: bool(view_mask[2 * i:2 * i + 2].any()) for i, s in enumerate("LR")}
    probs = {"density": dict(zip(DENSITIES, density.tolist())),
             "birads": {s: dict(zip(BIRADS_CLASSES, birads[i].tolist())) if present[s] else None
                        for i, s in enumerate("LR")},
             "findings": {s: dict(zip(FINDINGS, findings[i].tolist())) if present[s] else None
                          for i, s in enumerate("LR")}}
    birads_idx, positive = points.birads_labels(birads).tolist(), points.finding_positive(findings).tolist()
    side_birads = {s: BIRADS_CLASSES[birads_idx[i]] if present[s] else None for i, s in enumerate("LR")}
    pred = {"density": DENSITIES[int(density.argmax())],
            "birads": {**side_birads, "exam": most_severe(list(side_birads.values()))},
            "findings": {s: ({f: "pos" if on else "neg" for f, on in zip(FINDINGS, positive[i])}
                             if present[s] else {}) for i, s in enumerate("LR")}}
    views = [v for v, m in zip(VIEWS, view_mask.tolist()) if m]
    record = {"exam_id": exam_id, "views": views, "probs": probs, "pred": pred}
    if descriptors:
        record["probs"]["descriptors"] = {
            s: {name: dict(zip(DESCRIPTORS[name], p[i].tolist())) for name, p in descriptors.items()}
            if present[s] else None for i, s in enumerate("LR")}
        record["pred"]["descriptors"] = {
            s: {name: DESCRIPTORS[name][int(p[i].argmax())] for name, p in descriptors.items()}
            if present[s] else {} for i, s in enumerate("LR")}
    return record


def _feature_name(exam_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in exam_id)[:80]
    return f"{safe}-{hashlib.sha1(exam_id.encode()).hexdigest()[:8]}.safetensors"


def save_features(path: Path, tokens: torch.Tensor, view_mask: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens.contiguous(), "view_mask": view_mask.to(torch.uint8)}, str(tmp))


@torch.no_grad()
def predict_dataset(model: MultiViewClassifier, ds: ExamDataset, batch_size: int = 8,
                    features_dir: Path | None = None, progress: bool = True,
                    points: OperatingPoints = OperatingPoints(), num_workers: int = 0) -> list[dict]:
    """Records for every exam of ``ds``; writes feature files when ``features_dir`` is given.
    On a GPU the views load in ``num_workers`` processes into pinned memory and the model runs
    under bf16 autocast (as in training)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    records = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=num_workers, pin_memory=cuda)
    for batch in tqdm(loader, desc="stage1 predict", disable=not progress, leave=False):
        mask = batch["view_mask"]
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batch["images"].to(device, non_blocking=True), mask.to(device, non_blocking=True))
        dens, bir = out["density"].float().softmax(-1).cpu(), out["birads"].float().softmax(-1).cpu()
        find, tokens = out["findings"].float().sigmoid().cpu(), out["tokens"].float().cpu()
        desc = {k[5:]: v.float().softmax(-1).cpu() for k, v in out.items() if k.startswith("desc_")}
        for i, exam_id in enumerate(batch["exam_id"]):
            rec = exam_record(exam_id, dens[i], bir[i], find[i], mask[i],
                              {k: v[i] for k, v in desc.items()}, points)
            if features_dir is not None:
                name = _feature_name(exam_id)
                save_features(features_dir / name, tokens[i], mask[i])
                rec["features"] = f"{features_dir.name}/{name}"
            records.append(rec)
    return records


