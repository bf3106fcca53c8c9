"""How much of a reference report's wording can any decoder predict? (analysis for issue #17)

The synthetic reports are written from each exam's truth with random choices a decoder cannot
see: the report style (per exam), the opening of a mass sentence, the wording of the negatives and
of the BI-RADS line, and, for a decoder told only what the knowledge tokens carry, each lesion's
size, distance from the nipple and mass density. This script rebuilds the truth and the reference
report of every test exam of a synthetic set (``mammorg.synth``: the same generator, seed and
settings, no images rendered), draws ``--draws`` alternative reports per exam with those choices
redrawn, and scores against the references:

- ``random_draw``: one alternative per exam (a decoder that samples the generator exactly), the
  corpus scores averaged over the draws;
- ``mbr``: per exam, the alternative with the highest mean ROUGE-L against the other alternatives
  (minimum Bayes risk: about the best one fixed report can expect; no decoder with the same
  knowledge can expect much more).

Two knowledge levels: ``truth`` (every lesion detail known; only the wording is redrawn) and
``knowledge`` (also size, nipple distance and mass density redrawn: what gold knowledge tokens
carry). Prints one JSON object.

Usage: python scripts/wording_ceiling.py [--exams 900 --seed 0 --test-fraction 0.25 --draws 24 --styles S,S]
(the defaults are ``pipeline/benchmark_cpu``'s synthetic set: 231 test exams).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
from pycocoevalcap.rouge.rouge import Rouge

from evaluation.nlg import nlg_metrics, tokenize
from mammorg.synth import findings
from mammorg.synth.reports import write_report
from mammorg.synth.writer import SynthSettings, draw_exam

SCORES = ("bleu_4", "rouge_l", "cider")
STYLES = "us_screening,per_breast"  # pipeline/demo.yaml's synth.styles


def test_exams(settings: SynthSettings) -> list[tuple[int, dict, str]]:
    """(index, truth, reference report) of every test exam, drawn as ``synthesise_exam`` draws them."""
    exams = ((i, draw_exam(i, settings)[0]) for i in range(settings.exams))
    return [(i, e["truth"], e["report"]) for i, e in exams if e["split"] == "test"]


def unknown_details(truth: dict, rng: np.random.Generator) -> dict:
    """``truth`` with what knowledge tokens do not carry redrawn: sizes, nipple distances, mass density."""
    out = copy.deepcopy(truth)
    for breast in out["breasts"].values():
        for lesion in breast["lesions"]:
            kind = lesion["type"]
            if kind in findings.SIZE_MM:
                lesion["size_mm"] = int(rng.integers(*findings.SIZE_MM[kind]))
            if kind == "lymph_node":
                lesion["size_mm"] = int(rng.integers(14, 24) if lesion["enlarged"] else rng.integers(5, 10))
            if kind == "mass":
                lesion["density"] = str(rng.choice(findings.MASS_DENSITIES, p=(0.5, 0.4, 0.1)))
            if "nipple_distance_cm" in lesion:
                lesion["nipple_distance_cm"] = round(float(rng.uniform(2.0, 9.0)), 1)
    return out


def alternatives(index: int, truth: dict, level: str, draws: int, seed: int, styles: tuple[str, ...]) -> list[str]:
    rng = np.random.default_rng([seed, index, 7919])
    out = []
    for _ in range(draws):
        t = unknown_details(truth, rng) if level == "knowledge" else truth
        out.append(write_report(t, str(rng.choice(styles)), rng))
    return out


def mbr_pick(candidates: list[str], rouge: Rouge) -> str:
    """The candidate with the highest mean ROUGE-L against the others."""
    toks = [tokenize(c) for c in candidates]
    scores = [np.mean([rouge.calc_score([a], [b]) for j, b in enumerate(toks) if j != i]) for i, a in enumerate(toks)]
    return candidates[int(np.argmax(scores))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--styles", default=STYLES, help="comma-separated report styles (as mammorg synth --styles)")
    args = ap.parse_args()
    start = time.perf_counter()
    styles = tuple(args.styles.split(","))
    settings = SynthSettings(exams=args.exams, seed=args.seed, styles=styles, test_fraction=args.test_fraction)
    exams = test_exams(settings)
    refs = [r for _, _, r in exams]
    rouge = Rouge()
    result: dict = {"test_exams": len(exams), "draws": args.draws}
    for level in ("truth", "knowledge"):
        alts = [alternatives(i, t, level, args.draws, args.seed, styles) for i, t, _ in exams]
        draws = [nlg_metrics([a[k] for a in alts], refs, meteor=False) for k in range(args.draws)]
        result[f"{level}/random_draw"] = {m: round(float(np.mean([d[m] for d in draws])), 4) for m in SCORES}
        mbr = nlg_metrics([mbr_pick(a, rouge) for a in alts], refs, meteor=False)
        result[f"{level}/mbr"] = {m: round(float(mbr[m]), 4) for m in SCORES}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
