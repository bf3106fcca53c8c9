"""Exam dataset over the preprocessing cache (dict-keyed samples) and augmentation."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mammorg.io import MammorgError, read_jsonl
from mammorg.labels import (BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS, VIEWS,
                            birads_class_mask)
from mammorg.preprocess import from_uint16, load_cached


def _labels(exam: dict) -> dict[str, torch.Tensor]:
    labels = exam.get("labels") or {}
    density = labels.get("density")
    birads = labels.get("birads") or {}
    findings = labels.get("findings") or {}
    f_target = torch.zeros(2, len(FINDINGS))
    f_mask = torch.zeros(2, len(FINDINGS))
    for s, side in enumerate("LR"):
        for j, name in enumerate(FINDINGS):
            state = (findings.get(side) or {}).get(name)
            if state in ("pos", "neg"):
                f_target[s, j], f_mask[s, j] = float(state == "pos"), 1.0
    desc = labels.get("descriptors") or {}
    descriptor_targets = {
        f"desc_{name}": torch.tensor([classes.index(v) if (v := (desc.get(s) or {}).get(name)) in classes
                                      else -1 for s in "LR"])
        for name, classes in DESCRIPTORS.items()}
    return {**descriptor_targets,
            "density": torch.tensor(DENSITIES.index(density) if density in DENSITIES else -1),
            "birads_mask": torch.tensor([birads_class_mask(birads.get(s)) for s in "LR"]),
            "findings": f_target, "finding_mask": f_mask}


def fold_of(exam_id: str, folds: int) -> int:
    """Deterministic fold of an exam (a salted hash, so folds do not follow file order)."""
    return int(hashlib.sha256(f"fold:{exam_id}".encode()).hexdigest(), 16) % folds


class ExamDataset(Dataset):
    """Samples ``{"exam_id", "images" [4,1,H,W], "view_mask" [4], labels...}`` from a cache."""

    def __init__(self, cache_manifest: str | Path, split: str | None = None, augment: bool = False,
                 seed: int = 0, folds: int | None = None, fold: int | None = None,
                 holdout: bool = False):
        path = Path(cache_manifest)
        rows = read_jsonl(path)
        if rows and "cache" not in rows[0]:
            raise MammorgError(f"{path}: not a preprocessed manifest (run 'mammorg data preprocess')")
        self.root = path.parent
        rows = [r for r in rows if split is None or r.get("split") == split]
        if folds:  # k-fold: keep the other folds (training) or only this one (``holdout``)
            rows = [r for r in rows if (fold_of(r["exam_id"], folds) == fold) == holdout]
        self.exams = [r for r in rows if any(r["cache"].get(v) for v in VIEWS)]
        self.skipped = [r["exam_id"] for r in rows if not any(r["cache"].get(v) for v in VIEWS)]
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.exams)

    def _image(self, exam: dict, view: str) -> np.ndarray | None:
        rel = exam["cache"].get(view)
        return None if rel is None else from_uint16(np.asarray(load_cached(self.root, rel)))

    def __getitem__(self, i: int) -> dict:
        exam = self.exams[i]
        imgs = [self._image(exam, v) for v in VIEWS]
        shape = next(x.shape for x in imgs if x is not None)
        images = torch.stack([torch.from_numpy(x) if x is not None else torch.zeros(shape)
                              for x in imgs]).unsqueeze(1)
        sample = {"exam_id": exam["exam_id"], "images": images,
                  "view_mask": torch.tensor([x is not None for x in imgs]), **_labels(exam)}
        if self.augment:
            sample = augment(sample, np.random.default_rng([self.seed, self.epoch, i]))
        return sample


def augment(sample: dict, rng: np.random.Generator) -> dict:
    """Side swap (labels follow), gamma/contrast jitter and a small shift; dict in, dict out."""
    out = dict(sample)
    if rng.random() < 0.5:  # views are oriented alike, so swapping sides is label-consistent
        order = [2, 3, 0, 1]
        out["images"], out["view_mask"] = sample["images"][order], sample["view_mask"][order]
        for key in ("birads_mask", "findings", "finding_mask", *(k for k in sample if k.startswith("desc_"))):
            out[key] = sample[key].flip(0)
    img = out["images"].clamp(0, 1) ** float(rng.uniform(0.8, 1.25))
    img = (img * float(rng.uniform(0.9, 1.1))).clamp(0, 1)
    dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
    out["images"] = torch.roll(img, shifts=(dy, dx), dims=(-2, -1))
    return out


def collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "exam_id"}
    out["exam_id"] = [s["exam_id"] for s in samples]
    return out


def birads_class_weights(ds: ExamDataset, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights ``(1 / freq) ** power`` of the BI-RADS classes (mean 1)."""
    counts = torch.ones(len(BIRADS_CLASSES))  # +1 smoothing: absent classes stay finite
    for exam in ds.exams:
        birads = (exam.get("labels") or {}).get("birads") or {}
        for side in "LR":
            mask = torch.tensor(birads_class_mask(birads.get(side)), dtype=torch.float)
            if mask.sum():
                counts += mask / mask.sum()
    w = (counts.sum() / counts) ** power
    return w / w.mean()
