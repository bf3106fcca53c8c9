"""Heatmaps and lesion boxes: targets, localisation metrics and grounded findings.

A view's heatmap has ``h x w`` cells over its cached image (``H x W`` pixels); cell ``(i, j)``
covers pixels ``[j W/w, (j+1) W/w) x [i H/h, (i+1) H/h)``. Boxes are ``(finding, x0, y0, x1,
y1)`` rows in cached pixels (finding -1 = padding), as ``stage1_classification.data`` makes them.

Metrics (on views with boxes):
- **pointing game**: the hottest cell of a finding's map on a view with a box of that finding
  overlaps one of those boxes (hit rate per finding);
- **FROC**: candidates are the local maxima of each known map; a box is found when a candidate at
  or above the threshold lies in it, a candidate in no box of its finding is a false positive;
  the sensitivity at one false positive per image (view) is reported per finding and overall.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mammorg.labels import FINDINGS


def box_cells(boxes: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[..., K, h, w]`` bool: the cells each box overlaps (padding rows overlap nothing)."""
    (height, width), (h, w) = size, grid
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) * (height / h)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) * (width / w)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(1, 5))
    inside = (
        (xs.view(1, w) < x1)
        & (xs.view(1, w) + width / w > x0)
        & (ys.view(h, 1) < y1)
        & (ys.view(h, 1) + height / h > y0)
    )
    return inside & (boxes[..., 0] >= 0)[..., None, None]


def box_targets(boxes: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Rasterise ``boxes [B, 4, K, 5]`` onto heatmap cells: ``[B, 4, F, h, w]``, 1 where a cell
    overlaps a box of the finding."""
    inside = box_cells(boxes, size, grid).to(boxes.dtype)
    finding = boxes[..., 0].long()
    onehot = F.one_hot(finding.clamp_min(0), len(FINDINGS)).to(boxes.dtype) * (finding >= 0).unsqueeze(-1)
    return (torch.einsum("bvkf,bvkhw->bvfhw", onehot, inside) > 0).to(boxes.dtype)


def _peaks(prob: torch.Tensor) -> torch.Tensor:
    """Local maxima (3x3) of maps ``[..., h, w]``."""
    flat = prob.reshape(-1, 1, *prob.shape[-2:])
    pooled = F.max_pool2d(flat, 3, stride=1, padding=1).reshape(prob.shape)
    return prob >= pooled


def peak_centres(heat: torch.Tensor) -> torch.Tensor:
    """``heat [..., h, w]`` logits -> each map's peak ``[..., 2]`` (x, y in [0, 1]) below the cell
    size: the hottest cell's centre moved by the softmax-weighted mean offset of its 3x3
    neighbourhood (cells outside the map do not count). On the localisation benchmark this halves
    the median distance from a lesion's box centre (0.32 -> 0.13 of a crop's side)."""
    h, w = heat.shape[-2:]
    maps = heat.reshape(-1, 1, h, w)
    padded = F.pad(maps, (1, 1, 1, 1), value=torch.finfo(maps.dtype).min)
    windows = F.unfold(padded, 3)  # [N, 9, h*w]: each cell's 3x3 neighbourhood, rows first
    top = maps.flatten(1).argmax(-1)  # [N]
    weight = windows.gather(2, top.view(-1, 1, 1).expand(-1, 9, 1)).squeeze(2).float().softmax(-1).view(-1, 3, 3)
    step = torch.tensor([-1.0, 0.0, 1.0], device=heat.device)
    dy, dx = (weight.sum(2) * step).sum(1), (weight.sum(1) * step).sum(1)
    x = ((top % w).float() + 0.5 + dx) / w
    y = (torch.div(top, w, rounding_mode="floor").float() + 0.5 + dy) / h
    return torch.stack([x, y], -1).view(*heat.shape[:-2], 2)


def localisation_metrics(outputs: list[dict], batches: list[dict]) -> dict[str, Any]:
    """Pointing-game hit rate and FROC sensitivity at 1 false positive per image, per finding."""
    hits: dict[str, list[bool]] = {f: [] for f in FINDINGS}
    candidates: dict[str, list[tuple[float, int, int]]] = {f: [] for f in FINDINGS}  # (score, box id, is_fp)
    boxes_total = dict.fromkeys(FINDINGS, 0)
    images = 0
    box_id = 0
    for out, batch in zip(outputs, batches):
        if "heatmaps" not in out or "boxes" not in batch:
            return {}
        heat = out["heatmaps"].float()
        grid = (heat.shape[-2], heat.shape[-1])
        size = (batch["images"].shape[-2], batch["images"].shape[-1])
        inside = box_cells(batch["boxes"].float(), size, grid)  # [B, 4, K, h, w]
        prob = heat.sigmoid()
        peaks = _peaks(prob)
        known = batch["box_known"].bool() & batch["view_mask"].bool().unsqueeze(-1)
        images += int(batch["view_mask"].bool().sum())
        for b, v in zip(*torch.nonzero(batch["view_mask"].bool(), as_tuple=True)):
            for f, name in enumerate(FINDINGS):
                if not known[b, v, f]:
                    continue
                rows = (batch["boxes"][b, v, :, 0] == f).nonzero().flatten().tolist()
                cells = inside[b, v, rows]  # [k, h, w]
                flat = int(prob[b, v, f].argmax())
                if rows:
                    hits[name].append(bool(cells.flatten(1)[:, flat].any()))
                boxes_total[name] += len(rows)
                ids = list(range(box_id, box_id + len(rows)))
                box_id += len(rows)
                for i, j in peaks[b, v, f].nonzero().tolist():
                    score = float(prob[b, v, f, i, j])
                    owner = [ids[k] for k in range(len(rows)) if cells[k, i, j]]
                    candidates[name].append((score, owner[0] if owner else -1, int(not owner)))
    result: dict[str, Any] = {
        "pointing_game": {f: float(np.mean(h)) for f, h in hits.items() if h},
        "froc_sensitivity_at_1fp": {},
    }
    for name, cands in candidates.items():
        if boxes_total[name]:
            result["froc_sensitivity_at_1fp"][name] = _sensitivity_at(cands, boxes_total[name], images, 1.0)
    all_hits = [h for f in ("mass", "calcification") for h in hits[f]]
    result["pointing_game_mass_calc"] = float(np.mean(all_hits)) if all_hits else float("nan")
    pooled = [c for cands in candidates.values() for c in cands]
    total = sum(boxes_total.values())
    result["froc_sensitivity_at_1fp_all"] = _sensitivity_at(pooled, total, images, 1.0) if total else float("nan")
    return result


def _sensitivity_at(cands: list[tuple[float, int, int]], boxes: int, images: int, fp_rate: float) -> float:
    """Sensitivity at the lowest threshold whose false positives per image stay <= ``fp_rate``."""
    found: set[int] = set()
    fps, best = 0, 0.0
    for _score, owner, is_fp in sorted(cands, key=lambda c: -c[0]):
        if is_fp:
            fps += 1
            if fps / max(images, 1) > fp_rate:
                break
        else:
            found.add(owner)
        best = len(found) / boxes
    return float(best)


# ---------------------------------------------------------------- grounded findings


def peak_box(prob: torch.Tensor, size: tuple[int, int], share: float = 0.5) -> tuple[float, tuple[float, ...]]:
    """(peak score, box in cached pixels) of one map ``[h, w]``: the connected cells (4-connected)
    around the hottest one whose score is at least ``share`` of the peak."""
    h, w = prob.shape
    flat = int(prob.argmax())
    peak = float(prob.flatten()[flat])
    regions, _ = ndimage.label((prob >= share * peak).cpu().numpy())
    ii, jj = np.nonzero(regions == regions[flat // w, flat % w])
    ch, cw = size[0] / h, size[1] / w
    return peak, (float(jj.min() * cw), float(ii.min() * ch), float((jj.max() + 1) * cw), float((ii.max() + 1) * ch))


def _third(value: float, words: tuple[str, str, str]) -> str:
    return words[min(2, max(0, int(value * 3)))]


def location_from_views(side: str, cc: tuple[float, float] | None, mlo: tuple[float, float] | None) -> dict:
    """Side, quadrant, clock position and depth from a lesion's centre on the CC and the MLO view,
    as fractions (x of the breast's extent from the chest wall to the nipple, y of the cached
    image's height; chest wall left, y down; CC lateral at the top, MLO upper at the top: the
    synthetic generator's and the usual display convention).

    Depth: the distance from the chest wall in thirds (posterior, middle, anterior). Quadrant:
    upper/lower from the MLO, outer/inner from the CC; with one view only, that half is given.
    Clock: the angle of (lateral, upward) offsets from the breast's centre line, 3 o'clock lateral
    on the left breast and 9 o'clock on the right."""
    out: dict[str, Any] = {"side": side}
    xs = [p[0] for p in (cc, mlo) if p is not None]
    if xs:
        out["depth"] = _third(float(np.mean(xs)), ("posterior", "middle", "anterior"))
    up = (0.5 - mlo[1]) if mlo is not None else None
    lateral = (0.5 - cc[1]) if cc is not None else None
    if up is not None and lateral is not None:
        out["quadrant"] = f"{'upper' if up >= 0 else 'lower'} {'outer' if lateral >= 0 else 'inner'}"
        angle = math.degrees(math.atan2(up, lateral if side == "L" else -lateral))  # 0 = 3 o'clock
        out["clock"] = round(3 - angle / 30) % 12 or 12
    elif up is not None:
        out["quadrant"] = "upper" if up >= 0 else "lower"
    elif lateral is not None:
        out["quadrant"] = "outer" if lateral >= 0 else "inner"
    return out


def _breast_extent(image: torch.Tensor) -> float:
    """The breast's extent from the chest wall (left) in pixels: the last column with tissue."""
    cols = (image.reshape(image.shape[-2], image.shape[-1]) > 0.02).float().mean(0) > 0.01
    idx = torch.nonzero(cols).flatten()
    return float(idx.max() + 1) if idx.numel() else float(image.shape[-1])


def grounded_findings(
    positive: dict[str, list[str]],
    heat: torch.Tensor,
    images: torch.Tensor,
    view_mask: torch.Tensor,
    geometry: dict[str, dict],
) -> list[Any]:
    """Where stage 1 sees each finding it calls positive (``positive[side]``): the view with
    the hottest cell of the finding's map, the box around that peak (in original-image pixels
    when the view's preprocessing geometry is known, else cached pixels), the peak score and
    the location from the side's CC/MLO pair. ``heat [4, F, h, w]`` probabilities, ``images
    [4, 1, H, W]``."""
    from mammorg.geometry import box_to_original
    from mammorg.labels import VIEWS
    from mammorg.schema import Box, GroundedFinding

    size = (images.shape[-2], images.shape[-1])
    out = []
    extents: dict[str, float] = {}
    for side, findings in positive.items():
        views = [v for v in (f"{side}_CC", f"{side}_MLO") if view_mask[VIEWS.index(v)]]
        for name in findings:
            f = FINDINGS.index(name)
            peaks = {v: peak_box(heat[VIEWS.index(v), f], size) for v in views}
            if not peaks:
                continue
            view = max(peaks, key=lambda v: peaks[v][0])
            score, coords = peaks[view]
            box = Box(*coords)
            if geometry.get(view):
                box = box_to_original(box, geometry[view])
            centres = {}
            for v, (_, (x0, y0, x1, y1)) in peaks.items():
                if v not in extents:  # once a view
                    extents[v] = _breast_extent(images[VIEWS.index(v)])
                centres[v.split("_")[1]] = (min(1.0, (x0 + x1) / 2 / extents[v]), (y0 + y1) / 2 / size[0])
            location = location_from_views(side, centres.get("CC"), centres.get("MLO"))
            out.append(GroundedFinding(side, name, score, view, box, location))
    return out
