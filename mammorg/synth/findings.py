"""Sampling of exam ground truth: density, lesions per breast and BI-RADS by rule."""

from __future__ import annotations

import numpy as np

from mammorg.labels import BIRADS_CLASSES, DENSITIES, most_severe

QUADRANTS = ("upper outer", "upper inner", "lower outer", "lower inner")
_CLOCK_RANGES = {  # clock hours per quadrant, as seen facing the patient
    ("R", "upper outer"): (9, 12),
    ("R", "upper inner"): (12, 3),
    ("R", "lower inner"): (3, 6),
    ("R", "lower outer"): (6, 9),
    ("L", "upper outer"): (12, 3),
    ("L", "upper inner"): (9, 12),
    ("L", "lower outer"): (3, 6),
    ("L", "lower inner"): (6, 9),
}
DEPTHS = ("anterior", "middle", "posterior")
MASS_SHAPES = ("oval", "round", "irregular")
MASS_MARGINS = ("circumscribed", "obscured", "microlobulated", "indistinct", "spiculated")
MASS_DENSITIES = ("high", "equal", "low")
BENIGN_CALCS = ("coarse or popcorn-like", "round", "rim", "vascular", "large rod-like")
SUSPICIOUS_CALCS = ("amorphous", "coarse heterogeneous", "fine pleomorphic", "fine linear branching")
SUSPICIOUS_DISTRIBUTIONS = ("grouped", "linear", "segmental", "regional")

SIZE_MM = {  # size_mm = rng.integers(low, high) per lesion type (lymph nodes: by kind, in _lesion)
    "mass": (6, 28),
    "calcification": (5, 20),
    "asymmetry": (15, 35),
    "architectural_distortion": (12, 25),
}
_LESION_WEIGHTS = {
    "mass": 0.36,
    "calcification": 0.32,
    "asymmetry": 0.12,
    "architectural_distortion": 0.08,
    "lymph_node": 0.12,
}


def _location(rng: np.random.Generator, side: str) -> dict:
    quadrant = str(rng.choice(QUADRANTS))
    start, _ = _CLOCK_RANGES[(side, quadrant)]
    clock = (start + int(rng.integers(0, 3)) - 1) % 12 + 1
    return {
        "quadrant": quadrant,
        "clock": clock,
        "depth": str(rng.choice(DEPTHS)),
        "nipple_distance_cm": round(float(rng.uniform(2.0, 9.0)), 1),
    }


def _mass(rng: np.random.Generator, malignant: bool) -> dict:
    if malignant:
        shape = str(rng.choice(("irregular", "irregular", "oval", "round")))
        margin = str(rng.choice(("indistinct", "spiculated", "microlobulated", "obscured")))
    else:
        shape = str(rng.choice(("oval", "oval", "round")))
        margin = str(rng.choice(("circumscribed", "circumscribed", "obscured")))
    return {
        "type": "mass",
        "shape": shape,
        "margin": margin,
        "density": str(rng.choice(MASS_DENSITIES, p=(0.5, 0.4, 0.1))),
        "size_mm": int(rng.integers(*SIZE_MM["mass"])),
    }


def _calcification(rng: np.random.Generator, malignant: bool) -> dict:
    if malignant:
        morph = str(rng.choice(SUSPICIOUS_CALCS))
        dist = str(rng.choice(SUSPICIOUS_DISTRIBUTIONS))
    else:
        morph, dist = str(rng.choice(BENIGN_CALCS)), str(rng.choice(("scattered", "diffuse", "regional")))
    return {
        "type": "calcification",
        "morphology": morph,
        "distribution": dist,
        "size_mm": int(rng.integers(*SIZE_MM["calcification"])),
    }


def _lesion(rng: np.random.Generator, kind: str, side: str) -> dict:
    malignant = bool(rng.random() < 0.45)
    if kind == "mass":
        lesion = _mass(rng, malignant)
    elif kind == "calcification":
        lesion = _calcification(rng, malignant)
    elif kind == "asymmetry":
        lesion = {"type": "asymmetry", "kind": "focal asymmetry", "size_mm": int(rng.integers(*SIZE_MM[kind]))}
    elif kind == "architectural_distortion":
        lesion = {"type": "architectural_distortion", "size_mm": int(rng.integers(*SIZE_MM[kind]))}
    else:
        axillary = bool(rng.random() < 0.4)
        lesion = {
            "type": "lymph_node",
            "kind": "axillary" if axillary else "intramammary",
            "enlarged": axillary,
            "size_mm": int(rng.integers(14, 24) if axillary else rng.integers(5, 10)),
        }
    lesion.update(_location(rng, side))
    if kind == "lymph_node" and lesion["kind"] == "axillary":
        lesion.update(quadrant="axillary tail", depth="posterior")
    return lesion


def lesion_birads(lesion: dict) -> str:
    """BI-RADS suggested by a single lesion (DOMAIN.md: typical suspicion by feature)."""
    kind = lesion["type"]
    if kind == "mass":
        if lesion["shape"] == "irregular" and lesion["margin"] == "spiculated":
            return "5"
        return {
            "circumscribed": "3",
            "obscured": "4A",
            "microlobulated": "4A",
            "indistinct": "4B",
            "spiculated": "4C",
        }[lesion["margin"]]
    if kind == "calcification":
        if lesion["morphology"] in BENIGN_CALCS:
            return "2"
        return "4C" if lesion["morphology"] == "fine linear branching" else "4B"
    if kind == "asymmetry":
        return "3"
    if kind == "architectural_distortion":
        return "4B"
    if kind == "lymph_node":
        return "4A" if lesion["enlarged"] else "2"
    return "5"  # associated features only occur with suspicious masses


def _associated_features(rng: np.random.Generator, lesions: list[dict]) -> list[dict]:
    """Skin thickening / nipple retraction beside a highly suspicious mass."""
    extra = []
    for lesion in lesions:
        if lesion["type"] == "mass" and lesion_birads(lesion) in ("4C", "5"):
            if rng.random() < 0.35:
                extra.append({"type": "skin_thickening", "associated_with": "mass"})
            if rng.random() < 0.25:
                extra.append({"type": "nipple_retraction", "associated_with": "mass"})
    return extra


def _noisy(rng: np.random.Generator, value: str, options: tuple[str, ...], p: float) -> str:
    if rng.random() >= p or value not in options:  # e.g. a recall ("0") keeps its category
        return value
    i = options.index(value)
    j = min(len(options) - 1, max(0, i + int(rng.choice((-1, 1)))))
    return options[j]


def sample_exam(rng: np.random.Generator, label_noise: float = 0.0, finding_rate: float = 0.55) -> dict:
    """Ground truth of one exam: density, lesions per side and BI-RADS labels."""
    density = str(rng.choice(DENSITIES, p=(0.12, 0.38, 0.38, 0.12)))
    breasts: dict[str, dict] = {}
    kinds, weights = list(_LESION_WEIGHTS), np.array(list(_LESION_WEIGHTS.values()))
    for side in ("L", "R"):
        lesions: list[dict] = []
        if rng.random() < finding_rate:
            n = 1 if rng.random() < 0.8 else 2
            for kind in rng.choice(kinds, size=n, replace=False, p=weights / weights.sum()):
                lesions.append(_lesion(rng, str(kind), side))
        lesions += _associated_features(rng, lesions)
        birads = most_severe([lesion_birads(x) for x in lesions]) or "1"
        if birads == "3" and any(x["type"] == "asymmetry" for x in lesions) and rng.random() < 0.3:
            birads = "0"
        breasts[side] = {"lesions": lesions, "birads": _noisy(rng, birads, BIRADS_CLASSES[1:], label_noise)}
    density_label = _noisy(rng, density, DENSITIES, label_noise)
    return {
        "density": density_label,
        "true_density": density,
        "breasts": breasts,
        "exam_birads": most_severe([breasts["L"]["birads"], breasts["R"]["birads"]]),
    }
