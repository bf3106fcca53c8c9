"""Validation metrics of stage 1: BI-RADS/density macro-F1 and accuracy, finding AUROC, ECE."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

from mammorg.labels import FINDINGS
from stage1_classification.localisation import localisation_metrics


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(ece)


def stage1_metrics(outputs: list[dict], batches: list[dict]) -> dict:
    dens_p = torch.cat([o["density"] for o in outputs]).softmax(-1).numpy()
    dens_y = torch.cat([b["density"] for b in batches]).numpy()
    bir_p = torch.cat([o["birads"] for o in outputs]).softmax(-1).reshape(-1, 9).numpy()
    bir_m = torch.cat([b["birads_mask"] for b in batches]).reshape(-1, 9).numpy()
    exact = bir_m.sum(1) == 1
    bir_y = bir_m.argmax(1)
    out: dict = {}
    if (dens_y >= 0).any():
        k = dens_y >= 0
        out["density_acc"] = float((dens_p[k].argmax(1) == dens_y[k]).mean())
        out["density_f1"] = float(f1_score(dens_y[k], dens_p[k].argmax(1), average="macro"))
        out["density_ece"] = expected_calibration_error(dens_p[k], dens_y[k])
    if exact.any():
        out["birads_acc"] = float((bir_p[exact].argmax(1) == bir_y[exact]).mean())
        out["birads_f1"] = float(f1_score(bir_y[exact], bir_p[exact].argmax(1), average="macro"))
        out["birads_ece"] = expected_calibration_error(bir_p[exact], bir_y[exact])
    f_p = torch.cat([o["findings"] for o in outputs]).sigmoid().reshape(-1, len(FINDINGS)).numpy()
    f_y = torch.cat([b["findings"] for b in batches]).reshape(-1, len(FINDINGS)).numpy()
    f_m = torch.cat([b["finding_mask"] for b in batches]).reshape(-1, len(FINDINGS)).numpy() > 0
    aurocs = {}
    for j, name in enumerate(FINDINGS):
        y = f_y[f_m[:, j], j]
        if len(np.unique(y)) == 2:
            aurocs[name] = float(roc_auc_score(y, f_p[f_m[:, j], j]))
    out["finding_auroc"] = aurocs
    out["finding_auroc_mean"] = float(np.mean(list(aurocs.values()))) if aurocs else float("nan")
    for key in (k for k in outputs[0] if k.startswith("desc_")):
        y = torch.cat([b[key] for b in batches]).flatten()
        pred = torch.cat([o[key] for o in outputs]).argmax(-1).flatten()
        if (y >= 0).any():
            out[f"{key}_acc"] = float((pred[y >= 0] == y[y >= 0]).float().mean())
    if "heatmaps" in outputs[0]:
        out["localisation"] = localisation_metrics(outputs, batches)
    out["score"] = selection_score(out)
    return out


def selection_score(val: dict) -> float:
    """The checkpoint-selection score: mean of BI-RADS macro-F1, density macro-F1 and mean finding AUROC.

    BI-RADS macro-F1 alone is noisy on a small validation split (nine classes, a few exams each); the
    finding AUROC keeps a checkpoint whose heatmaps have not trained from being chosen for it.
    """
    parts = [val.get("birads_f1", np.nan), val.get("density_f1", np.nan), val.get("finding_auroc_mean", np.nan)]
    return float(np.nanmean(parts)) if np.isfinite(parts).any() else float("nan")
