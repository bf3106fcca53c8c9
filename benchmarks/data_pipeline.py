"""Data pipeline throughput: decode+preprocess (uncompressed, JPEG 2000) vs. loading from cache.

Prints one JSON object. Run: python benchmarks/data_pipeline.py [--views N] [--size H W]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless

from mammorg.io import read_jsonl
from mammorg.preprocess import PreprocessSpec, load_cached, preprocess_file, preprocess_manifest
from mammorg.synth.writer import SynthSettings, synthesise


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exams", type=int, default=16)
    ap.add_argument("--size", nargs=2, type=int, default=[1024, 512])
    args = ap.parse_args()
    h, w = args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth_rate = _rate(
            args.exams,
            lambda: synthesise(root / "s", SynthSettings(exams=args.exams, height=h, width=w), progress=False),
        )
        rows = read_jsonl(root / "s" / "manifest.jsonl")
        files = [root / "s" / p for r in rows for p in r["views"].values()]
        spec = PreprocessSpec(height=512, width=256)
        raw_rate = _rate(len(files), lambda: [preprocess_file(f, spec) for f in files])
        j2k = []
        for i, f in enumerate(files[:8]):
            ds = pydicom.dcmread(f)
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
            ds.save_as(root / f"j{i}.dcm")
            j2k.append(root / f"j{i}.dcm")
        j2k_rate = _rate(len(j2k), lambda: [preprocess_file(f, spec) for f in j2k])
        manifest = root / "s" / "manifest.jsonl"
        preprocess_manifest(manifest, root / "cache", spec, workers=1, progress=False)
        cached = read_jsonl(root / "cache" / "manifest.jsonl")
        entries = [e for r in cached for e in r["cache"].values()]
        cache_rate = _rate(
            len(entries),
            lambda: [np.asarray(load_cached(root / "cache", e), dtype=np.float32) for e in entries],
        )
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "source_size": [h, w],
                "target_size": [512, 256],
                "synth_exams_per_s": round(synth_rate, 2),
                "decode_preprocess_views_per_s_uncompressed": round(raw_rate, 1),
                "decode_preprocess_views_per_s_jpeg2000": round(j2k_rate, 1),
                "cache_load_views_per_s": round(cache_rate, 1),
                "cache_speedup_vs_uncompressed": round(cache_rate / raw_rate, 1),
                "cache_speedup_vs_jpeg2000": round(cache_rate / j2k_rate, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
