"""Canonical label space (docs/design.md section 3): sides, views, density, BI-RADS, findings."""

from __future__ import annotations

from collections.abc import Sequence

SIDES: tuple[str, ...] = ("L", "R")
SIDE_WORDS: dict[str, str] = {"L": "left", "R": "right"}
VIEWS: tuple[str, ...] = ("L_CC", "L_MLO", "R_CC", "R_MLO")
PROJECTIONS: tuple[str, ...] = ("CC", "MLO")
DENSITIES: tuple[str, ...] = ("a", "b", "c", "d")
BIRADS_VALUES: tuple[str, ...] = ("0", "1", "2", "3", "4", "4A", "4B", "4C", "5", "6")
# Classes of the stage-1 BI-RADS head; a bare "4" is a partial label over 4A/4B/4C.
BIRADS_CLASSES: tuple[str, ...] = ("0", "1", "2", "3", "4A", "4B", "4C", "5", "6")
# The ACR BI-RADS assessment category names (5th edition), as reports write them after the category
BIRADS_NAMES: dict[str, str] = {
    "0": "Incomplete - need additional imaging evaluation",
    "1": "Negative",
    "2": "Benign",
    "3": "Probably benign",
    "4": "Suspicious",
    "4A": "Low suspicion for malignancy",
    "4B": "Moderate suspicion for malignancy",
    "4C": "High suspicion for malignancy",
    "5": "Highly suggestive of malignancy",
    "6": "Known biopsy-proven malignancy",
}
FINDINGS: tuple[str, ...] = (
    "mass",
    "calcification",
    "asymmetry",
    "architectural_distortion",
    "skin_thickening",
    "nipple_retraction",
    "lymph_node",
)
FINDING_STATES: tuple[str, ...] = ("pos", "neg", "unc")

# Severity used for the exam-level category: 0 ranks above the benign categories.
_SEVERITY = {"1": 0, "2": 1, "3": 2, "0": 3, "4": 4, "4A": 5, "4B": 6, "4C": 7, "5": 8, "6": 9}


def birads_severity(value: str) -> int:
    """Rank of a BI-RADS value; higher is more severe."""
    return _SEVERITY[value]


def most_severe(values: Sequence[str | None]) -> str | None:
    """The most severe of the given BI-RADS values (None entries ignored)."""
    present = [v for v in values if v is not None]
    return max(present, key=birads_severity) if present else None


def birads_agrees_with_findings(category: str, any_finding: bool) -> bool:
    """Whether a category agrees with whether its breast (or exam) has a finding: BI-RADS 1
    (negative) has none, 4 and above (suspicious, known malignancy) need one."""
    if category == "1":
        return not any_finding
    return any_finding or birads_severity(category) < birads_severity("4")


def birads_class_mask(value: str | None) -> list[bool]:
    """Which BI-RADS head classes are compatible with a label (a bare 4 admits 4A/4B/4C)."""
    if value is None:
        return [False] * len(BIRADS_CLASSES)
    if value == "4":
        return [c in ("4A", "4B", "4C") for c in BIRADS_CLASSES]
    return [c == value for c in BIRADS_CLASSES]


def side_views(side: str) -> tuple[str, str]:
    """The CC and MLO view names of a breast."""
    return f"{side}_CC", f"{side}_MLO"


# Optional per-breast descriptors (BI-RADS lexicon), one value per breast: the most suspicious
# lesion's. Stored as ``labels.descriptors = {"L": {"mass_margin": "spiculated", ...}, "R": {}}``.
DESCRIPTORS: dict[str, tuple[str, ...]] = {
    "mass_shape": ("oval", "round", "irregular"),
    "mass_margin": ("circumscribed", "obscured", "microlobulated", "indistinct", "spiculated"),
    "calc_morphology": (
        "coarse or popcorn-like",
        "round",
        "rim",
        "vascular",
        "large rod-like",
        "amorphous",
        "coarse heterogeneous",
        "fine pleomorphic",
        "fine linear branching",
    ),
    "calc_distribution": ("diffuse", "regional", "grouped", "linear", "segmental"),
}
DESCRIBED_FINDING = {  # the finding each descriptor describes
    "mass_shape": "mass",
    "mass_margin": "mass",
    "calc_morphology": "calcification",
    "calc_distribution": "calcification",
}
_DESCRIPTOR_ALIASES = {
    "scattered": "diffuse",
    "pleomorphic": "fine pleomorphic",
    "clustered": "grouped",
    "ill defined": "indistinct",
    "lobulated": "oval",
    "popcorn": "coarse or popcorn-like",
    "large rodlike": "large rod-like",
}


def canonical_descriptor(name: str, value: str | None) -> str | None:
    """``("mass_margin", "SPICULATED")`` → ``"spiculated"``; None when not in the label space."""
    if not value:
        return None
    v = value.strip().lower().replace("_", " ").replace("-", " ")
    v = _DESCRIPTOR_ALIASES.get(v, v)
    return next((c for c in DESCRIPTORS[name] if c.replace("-", " ") == v.replace("-", " ")), None)
