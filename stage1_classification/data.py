"""Exam dataset over the preprocessing cache (dict-keyed samples) and augmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from mammorg.geometry import box_to_cache
from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS, SIDES, VIEWS, birads_class_mask
from mammorg.preprocess import from_uint16, load_cached
from mammorg.schema import Exam, Labels, read_manifest


def label_tensors(labels: Labels) -> dict[str, torch.Tensor]:
    """Training targets of one exam: density index (-1: none), BI-RADS class masks per side,
    finding targets with their masks (``unc``/missing masked), descriptor indices (-1: none)."""
    f_target = torch.zeros(2, len(FINDINGS))
    f_mask = torch.zeros(2, len(FINDINGS))
    for s, side in enumerate(SIDES):
        for j, name in enumerate(FINDINGS):
            state = labels.findings[side].get(name)
            if state in ("pos", "neg"):
                f_target[s, j], f_mask[s, j] = float(state == "pos"), 1.0
    desc = labels.descriptors
    descriptor_targets = {
        f"desc_{name}": torch.tensor(
            [classes.index(v) if (v := (desc.get(s) or {}).get(name)) in classes else -1 for s in SIDES]
        )
        for name, classes in DESCRIPTORS.items()
    }
    density = labels.density
    return {
        **descriptor_targets,
        "density": torch.tensor(DENSITIES.index(density) if density in DENSITIES else -1),
        "birads_mask": torch.tensor([birads_class_mask(labels.birads.get(s)) for s in SIDES]),
        "findings": f_target,
        "finding_mask": f_mask,
    }


MAX_BOXES = 8  # lesion boxes per view carried in a sample (more are rare; the first are kept)


def box_tensors(exam: Exam) -> dict[str, torch.Tensor]:
    """Lesion boxes in cached-image pixels, ``boxes [4, MAX_BOXES, 5]`` rows (finding index, x0,
    y0, x1, y1; finding -1 = padding), the BI-RADS classes compatible with each box's own
    category, ``box_birads [4, MAX_BOXES, C]`` (none: not given; VinDr-Mammo's ``finding_birads``,
    whose "4" allows 4A, 4B and 4C), and ``box_known [4, F]``: whether a
    view's heatmap target for a finding is known: the breast is negative for it (nothing
    anywhere), or the view has its boxes (inside them only). A positive finding without a box on
    a view is not known there."""
    boxes = torch.full((len(VIEWS), MAX_BOXES, 5), -1.0)
    box_birads = torch.zeros(len(VIEWS), MAX_BOXES, len(BIRADS_CLASSES), dtype=torch.bool)
    known = torch.zeros(len(VIEWS), len(FINDINGS), dtype=torch.bool)
    counts = [0] * len(VIEWS)
    for lesion in exam.lesions:
        if lesion.box is None or lesion.view not in VIEWS or lesion.finding not in FINDINGS:
            continue
        v = VIEWS.index(lesion.view)
        geometry = exam.geometry.get(lesion.view)
        if not geometry or not (exam.cache or {}).get(lesion.view):
            continue
        f = FINDINGS.index(lesion.finding)
        known[v, f] = True
        if counts[v] < MAX_BOXES:
            b = box_to_cache(lesion.box, geometry)
            boxes[v, counts[v]] = torch.tensor([f, b.xmin, b.ymin, b.xmax, b.ymax])
            box_birads[v, counts[v]] = torch.tensor(birads_class_mask(lesion.birads))
            counts[v] += 1
    for v, view in enumerate(VIEWS):
        states = exam.labels.findings.get(view.split("_")[0]) or {}
        for f, name in enumerate(FINDINGS):
            if states.get(name) == "neg" and (exam.cache or {}).get(view):
                known[v, f] = True
    return {"boxes": boxes, "box_birads": box_birads, "box_known": known}


def fold_of(exam_id: str, folds: int) -> int:
    """Deterministic fold of an exam (a salted hash, so folds do not follow file order)."""
    return int(hashlib.sha256(f"fold:{exam_id}".encode()).hexdigest(), 16) % folds


class ExamDataset(Dataset):
    """Samples ``{"exam_id", "images" [4,1,H,W], "view_mask" [4], labels...}`` from a cache."""

    def __init__(
        self,
        cache_manifest: str | Path,
        split: str | None = None,
        augment: bool = False,
        seed: int = 0,
        folds: int | None = None,
        fold: int | None = None,
        holdout: bool = False,
    ):
        path = Path(cache_manifest)
        rows = read_manifest(path)
        if rows and rows[0].cache is None:
            raise MammorgError(f"{path}: not a preprocessed manifest (run 'mammorg data preprocess')")
        self.root = path.parent
        rows = [r for r in rows if split is None or r.split == split]
        if folds:  # k-fold: keep the other folds (training) or only this one (``holdout``)
            rows = [r for r in rows if (fold_of(r.exam_id, folds) == fold) == holdout]
        self.exams: list[Exam] = [r for r in rows if any((r.cache or {}).get(v) for v in VIEWS)]
        self.skipped = [r.exam_id for r in rows if not any((r.cache or {}).get(v) for v in VIEWS)]
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.exams)

    def _image(self, exam: Exam, view: str) -> np.ndarray | None:
        rel = (exam.cache or {}).get(view)
        return None if rel is None else from_uint16(np.asarray(load_cached(self.root, rel)))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or (epoch, index) from ``EpochSampler`` (the epoch seeds the
        augmentation, also in persistent worker processes)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        exam = self.exams[i]
        imgs = [self._image(exam, v) for v in VIEWS]
        shape = next(x.shape for x in imgs if x is not None)
        images = torch.stack([torch.from_numpy(x) if x is not None else torch.zeros(shape) for x in imgs]).unsqueeze(1)
        sample = {
            "exam_id": exam.exam_id,
            "images": images,
            "view_mask": torch.tensor([x is not None for x in imgs]),
            **label_tensors(exam.labels),
            **box_tensors(exam),
        }
        if self.augment:
            sample = augment(sample, np.random.default_rng([self.seed, epoch, i]))
        return sample


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: the order of each epoch is a seeded permutation (or a
    ``DistributedSampler`` shard), and the epoch reaches the dataset with every index, so one
    DataLoader with persistent workers serves every epoch with the same samples as fresh ones."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, dataset: Any = None):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0
        self.shard: DistributedSampler | None = (
            DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=seed) if world > 1 else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shard is not None:
            self.shard.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shard) if self.shard is not None else self.size

    def __iter__(self):
        if self.shard is not None:
            order = list(self.shard)
        elif self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        return iter([(self.epoch, i) for i in order])


def augment(sample: dict, rng: np.random.Generator) -> dict:
    """Side swap (labels follow), gamma/contrast jitter and a small shift; dict in, dict out."""
    out = dict(sample)
    if rng.random() < 0.5:  # views are oriented alike, so swapping sides is label-consistent
        order = [2, 3, 0, 1]
        for key in ("images", "view_mask", "boxes", "box_birads", "box_known"):
            if key in sample:
                out[key] = sample[key][order]
        for key in ("birads_mask", "findings", "finding_mask", *(k for k in sample if k.startswith("desc_"))):
            out[key] = sample[key].flip(0)
    img = out["images"].clamp(0, 1) ** float(rng.uniform(0.8, 1.25))
    img = (img * float(rng.uniform(0.9, 1.1))).clamp(0, 1)
    dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
    out["images"] = torch.roll(img, shifts=(dy, dx), dims=(-2, -1))
    if "boxes" in out:  # boxes move with the image
        boxes = out["boxes"].clone()
        real = boxes[..., 0] >= 0
        boxes[..., 1:][real] += torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)
        out["boxes"] = boxes
    return out


def collate(samples: list[dict]) -> dict:
    out: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "exam_id"}
    out["exam_id"] = [s["exam_id"] for s in samples]
    return out


def birads_class_weights(ds: ExamDataset, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights ``(1 / freq) ** power`` of the BI-RADS classes (mean 1)."""
    counts = torch.ones(len(BIRADS_CLASSES))  # +1 smoothing: absent classes stay finite
    for exam in ds.exams:
        for side in SIDES:
            mask = torch.tensor(birads_class_mask(exam.labels.birads.get(side)), dtype=torch.float)
            if mask.sum():
                counts += mask / mask.sum()
    w = (counts.sum() / counts) ** power
    return w / w.mean()
