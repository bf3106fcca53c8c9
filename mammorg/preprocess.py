"""Geometry normalisation (orientation, breast crop, resize) and the decoded-view cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mammorg.dicom import MammoImage, decode_dataset, read_dicom
from mammorg.geometry import GEOMETRY_KEYS
from mammorg.io import MammorgError, atomic_path, sha256_file, write_json_atomic, write_jsonl_atomic
from mammorg.labels import VIEWS
from mammorg.raster import RASTER_SUFFIXES, read_raster
from mammorg.schema import Exam, read_manifest


@dataclass(frozen=True)
class PreprocessSpec:
    """Settings that define a cached view; part of the cache key."""

    height: int = 512
    width: int = 256
    crop_threshold: float = 0.04
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def orient_chest_wall_left(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """Flip horizontally so that the chest wall (the brighter half) is on the left."""
    half = img.shape[1] // 2
    flip = bool(img[:, half:].sum() > img[:, :half].sum())
    return (img[:, ::-1] if flip else img), flip


def breast_bbox(img: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of rows/columns whose foreground share exceeds 1%."""
    fg = img > float(np.percentile(img, 1.0)) + threshold
    rows = np.flatnonzero(fg.mean(axis=1) > 0.01)
    cols = np.flatnonzero(fg.mean(axis=0) > 0.01)
    if rows.size == 0 or cols.size == 0:
        return 0, img.shape[0], 0, img.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pad_to_aspect(img: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad bottom/right (away from the chest wall) to the target aspect ratio."""
    h, w = img.shape
    target = height / width
    if h / w > target:
        new_w, new_h = round(h / target), h
    else:
        new_w, new_h = w, round(w * target)
    out = np.zeros((new_h, new_w), dtype=img.dtype)
    top = (new_h - h) // 2
    out[top : top + h, :w] = img
    return out, (top, 0)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased bilinear resize of a 2-D float image."""
    if img.shape == (height, width):
        return img.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].clamp_(0, 1).numpy()


def normalise_geometry(img: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, dict]:
    """Orient, crop to the breast and resize; returns the image and the geometry applied."""
    oriented, flipped = orient_chest_wall_left(img)
    top, bottom, left, right = breast_bbox(oriented, spec.crop_threshold)
    cropped = oriented[top:bottom, left:right]
    padded, offset = pad_to_aspect(cropped, spec.height, spec.width)
    out = resize(padded, spec.height, spec.width)
    geometry = {
        "flipped": flipped,
        "crop": [top, bottom, left, right],
        "pad_offset": list(offset),
        "scale": spec.height / padded.shape[0],
        "source_shape": list(img.shape),
    }
    return out, geometry


def preprocess_file(path: str | Path, spec: PreprocessSpec, require_view: bool = False) -> tuple[np.ndarray, str, dict]:
    """Decode and normalise one image file (DICOM, or PNG/TIFF); ``require_view``: the view must
    be known (from the DICOM tags, or a raster file's name)."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        image = read_raster(path, require_view)
    else:
        image = read_dicom(path, require_view=require_view)
    return preprocess_image(image, spec)


def preprocess_dataset(
    ds: pydicom.Dataset, name: str, spec: PreprocessSpec, require_view: bool = False
) -> tuple[np.ndarray, str, dict]:
    """``preprocess_file`` on a DICOM dataset in memory (``name`` names it in errors)."""
    return preprocess_image(decode_dataset(ds, name, require_view=require_view), spec)


def preprocess_image(image: MammoImage, spec: PreprocessSpec) -> tuple[np.ndarray, str, dict]:
    out, geometry = normalise_geometry(image.pixels, spec)
    return out, image.view, {**image.meta, **geometry}


def to_uint16(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)


def from_uint16(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) / 65535.0


def file_digest(path: str | Path) -> str:
    return sha256_file(path)[:20]


def cache_entry_path(cache_dir: Path, digest: str, spec: PreprocessSpec) -> Path:
    return cache_dir / "views" / digest[:2] / f"{digest}_{spec.key()}.npy"


def cache_view(path: str, cache_dir: str, spec: PreprocessSpec) -> dict:
    """Decode one view into the cache unless already there (the entry, plus a JSON sidecar with
    the geometry that maps original pixels to cached ones); never raises for bad input."""
    try:
        entry = cache_entry_path(Path(cache_dir), file_digest(path), spec)
        sidecar = entry.with_suffix(".json")
        if entry.exists() and sidecar.exists():
            return {"entry": str(entry), "geometry": json.loads(sidecar.read_text()), "cached": True}
        img, _, meta = preprocess_file(path, spec)
        geometry = {k: meta[k] for k in GEOMETRY_KEYS}
        with atomic_path(entry) as tmp, open(tmp, "wb") as fh:
            np.save(fh, to_uint16(img))
        write_json_atomic(sidecar, geometry)
        return {"entry": str(entry), "geometry": geometry, "cached": False}
    except MammorgError as exc:
        return {"error": str(exc)}
    except OSError as exc:
        return {"error": f"{path}: {exc.strerror or exc}"}


def preprocess_manifest(
    manifest: str | Path, cache_dir: str | Path, spec: PreprocessSpec, workers: int = 0, progress: bool = True
) -> dict:
    """Cache every view of a manifest; write ``cache_dir/manifest.jsonl`` with ``cache`` paths."""
    manifest, cache_dir = Path(manifest), Path(cache_dir)
    exams = read_manifest(manifest)
    jobs = [(i, v, str(ex.view_path(v, manifest.parent))) for i, ex in enumerate(exams) for v in ex.present_views]
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    results = _run_jobs(jobs, cache_dir, spec, workers, progress)
    problems: list[dict] = []
    out_rows: list[Exam] = []
    for i, ex in enumerate(exams):
        cache, geometry = {}, {}
        for v in VIEWS:
            res = results.get((i, v))
            if res is None:
                continue
            if "error" in res:
                problems.append({"exam_id": ex.exam_id, "view": v, "problem": res["error"]})
            else:
                cache[v] = os.path.relpath(res["entry"], cache_dir)
                geometry[v] = res["geometry"]
        if cache:
            views = {v: _view_for(ex, v, manifest.parent, cache_dir) for v in VIEWS}
            out_rows.append(dataclasses.replace(ex, views=views, cache=cache, geometry=geometry))
        else:
            problems.append({"exam_id": ex.exam_id, "view": None, "problem": "no usable view"})
    write_json_atomic(cache_dir / "spec.json", asdict(spec))
    write_jsonl_atomic(cache_dir / "manifest.jsonl", out_rows)
    write_jsonl_atomic(cache_dir / "problems.jsonl", problems)
    n_new = sum(1 for r in results.values() if r.get("cached") is False)
    return {
        "exams": len(out_rows),
        "views": len(jobs),
        "decoded": n_new,
        "reused": sum(1 for r in results.values() if r.get("cached")),
        "problems": problems,
    }


def _view_for(exam: Exam, view: str, source_dir: Path, cache_dir: Path) -> str | None:
    """A view's path as the cache manifest keeps it: relative to the cache folder (the manifest's
    own folder), or absolute when the source manifest gave it so."""
    value = exam.views.get(view)
    if not value:
        return None
    if Path(value).is_absolute():
        return value
    return os.path.relpath((source_dir / value).resolve(), cache_dir.resolve())


def _run_jobs(jobs: list, cache_dir: Path, spec: PreprocessSpec, workers: int, progress: bool) -> dict:
    bar = tqdm(total=len(jobs), desc="preprocess", unit="view", disable=not progress)
    results = {}
    if workers <= 1:
        for i, v, p in jobs:
            results[(i, v)] = cache_view(p, str(cache_dir), spec)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {(i, v): pool.submit(cache_view, p, str(cache_dir), spec) for i, v, p in jobs}
            for key, fut in futures.items():
                results[key] = fut.result()
                bar.update()
    bar.close()
    return results


def load_cached(cache_dir: str | Path, rel: str, mmap: bool = True) -> np.ndarray:
    """Load a cached view as uint16 (memory-mapped by default)."""
    return np.load(Path(cache_dir) / rel, mmap_mode="r" if mmap else None)
