"""Report text from exam truth, in several institutional styles, with matching labels."""

from __future__ import annotations

import numpy as np

from mammorg.labels import SIDE_WORDS, SIDES
from mammorg.schema import Labels

REPORT_STYLES = ("us_screening", "per_breast", "single_image", "free_text")
SIDE_WORD = SIDE_WORDS
COMPOSITION = {
    "a": ("The breasts are almost entirely fatty.", "almost entirely fatty breasts"),
    "b": (
        "There are scattered areas of fibroglandular density.",
        "scattered areas of fibroglandular density",
    ),
    "c": (
        "The breasts are heterogeneously dense, which may obscure small masses.",
        "heterogeneously dense breasts",
    ),
    "d": (
        "The breasts are extremely dense, which lowers the sensitivity of mammography.",
        "extremely dense breasts",
    ),
}
ASSESSMENT = {
    "0": ("Incomplete - need additional imaging evaluation", "Recall for additional imaging is recommended."),
    "1": ("Negative", "Routine screening mammography is recommended."),
    "2": ("Benign", "Routine screening mammography is recommended."),
    "3": ("Probably benign", "Short-interval follow-up mammography in 6 months is recommended."),
    "4A": ("Low suspicion for malignancy", "Tissue diagnosis is recommended."),
    "4B": ("Moderate suspicion for malignancy", "Tissue diagnosis is recommended."),
    "4C": ("High suspicion for malignancy", "Tissue diagnosis is recommended."),
    "5": ("Highly suggestive of malignancy", "Tissue diagnosis is recommended."),
    "6": ("Known biopsy-proven malignancy", "Surgical excision is recommended when appropriate."),
}
# The negatives a normal breast is described with; each becomes a "neg" label.
NEGATIVE_SET = ("mass", "calcification", "architectural_distortion")


def _location(lesion: dict, side: str | None) -> str:
    where = (
        f"the {lesion['quadrant']} quadrant" if lesion["quadrant"] != "axillary tail" else "the axillary tail"
    )
    breast = f" of the {SIDE_WORD[side]} breast" if side else ""
    return (
        f"{where}{breast} at {lesion['clock']} o'clock, {lesion['nipple_distance_cm']} cm from the nipple, "
        f"{lesion['depth']} depth"
    )


def describe_lesion(lesion: dict, side: str | None, rng: np.random.Generator, mass_word: str = "mass") -> str:
    """One sentence for one lesion; ``side=None`` leaves laterality out."""
    kind = lesion["type"]
    loc = _location(lesion, side) if "quadrant" in lesion else ""
    if kind == "mass":
        lead = rng.choice(("There is a", "A", "Noted is a"))
        return (
            f"{lead} {lesion['size_mm']} mm {lesion['shape']} {lesion['density']} density "
            f"{mass_word} with {lesion['margin']} margins in {loc}."
        )
    if kind == "calcification":
        dist = lesion["distribution"]
        return (
            f"{lesion['morphology'].capitalize()} calcifications in a {dist} distribution are seen in {loc}."
            if dist not in ("scattered", "diffuse")
            else f"{lesion['morphology'].capitalize()} calcifications are {dist} in "
            f"{'the ' + SIDE_WORD[side] + ' breast' if side else 'the breast'}."
        )
    if kind == "asymmetry":
        return f"A focal asymmetry is seen in {loc}."
    if kind == "architectural_distortion":
        return f"Architectural distortion is present in {loc}."
    if kind == "lymph_node":
        if lesion["enlarged"]:
            where = f"the {SIDE_WORD[side]} axilla" if side else "the axilla"
            return f"An enlarged axillary lymph node measuring {lesion['size_mm']} mm is seen in {where}."
        return f"An intramammary lymph node is seen in {loc}."
    if kind == "skin_thickening":
        return "There is associated skin thickening."
    return "There is associated nipple retraction."


def _negatives(rng: np.random.Generator, breast_label: str) -> str:
    return str(
        rng.choice(
            (
                f"No suspicious mass, calcifications or architectural distortion {breast_label}.",
                f"There is no mass, suspicious calcification, or architectural distortion {breast_label}.",
                "No dominant mass, suspicious microcalcifications or architectural distortion "
                f"{breast_label}.",
            )
        )
    )


def _side_findings(
    exam: dict, side: str, rng: np.random.Generator, with_side: bool, mass_word: str = "mass"
) -> list[str]:
    return [
        describe_lesion(x, side if with_side else None, rng, mass_word)
        for x in exam["breasts"][side]["lesions"]
    ]


def _birads_line(rng: np.random.Generator, category: str) -> str:
    name, _ = ASSESSMENT[category]
    form = rng.choice(("BI-RADS Category {c}: {n}.", "BI-RADS {c} - {n}.", "BIRADS: {c} ({n})."))
    return form.format(c=category, n=name)


def _us_screening(exam: dict, rng: np.random.Generator) -> str:
    parts = ["BREAST COMPOSITION: " + COMPOSITION[exam["density"]][0], "FINDINGS:"]
    normal = [s for s in "RL" if not exam["breasts"][s]["lesions"]]
    for side in "RL":
        parts += _side_findings(exam, side, rng, with_side=True)
    if len(normal) == 2:
        parts.append(_negatives(rng, "in either breast"))
    elif normal:
        parts.append(_negatives(rng, f"in the {SIDE_WORD[normal[0]]} breast"))
    parts.append("IMPRESSION:")
    for side in "RL":
        if exam["breasts"][side]["lesions"] or exam["breasts"][side]["birads"] != "1":
            parts.append(
                f"{SIDE_WORD[side].capitalize()} breast: "
                + _birads_line(rng, exam["breasts"][side]["birads"])
            )
    if len(parts) and parts[-1] == "IMPRESSION:":
        parts.append("No mammographic evidence of malignancy.")
    parts.append("Overall: " + _birads_line(rng, exam["exam_birads"]))
    parts.append(ASSESSMENT[exam["exam_birads"]][1])
    return "\n".join(parts)


def _per_breast(exam: dict, rng: np.random.Generator) -> str:
    parts = [f"Breast composition: {COMPOSITION[exam['density']][0]}"]
    for side in "RL":
        lines = _side_findings(exam, side, rng, with_side=False)
        body = " ".join(lines) if lines else _negatives(rng, "").replace(" .", ".")
        parts.append(f"{SIDE_WORD[side].capitalize()} Breast: {body}")
    opinion = [f"{SIDE_WORD[s].capitalize()} breast BI-RADS {exam['breasts'][s]['birads']}." for s in "RL"]
    parts.append("OPINION: " + " ".join(opinion) + " " + ASSESSMENT[exam["exam_birads"]][1])
    return "\n".join(parts)


def _single_image(exam: dict, rng: np.random.Generator) -> str:
    acr = exam["density"].upper()
    lines = [s for side in "RL" for s in _side_findings(exam, side, rng, False, "soft opacity")]
    findings = " ".join(lines) if lines else "No abnormal soft opacity or suspicious calcification seen."
    return (
        f"Breast Composition: {COMPOSITION[exam['density']][1].capitalize()} (ACR {acr})\n"
        f"BIRADS: {exam['exam_birads']}\nFindings: {findings}"
    )


def _free_text(exam: dict, rng: np.random.Generator) -> str:
    parts = [f"bilateral mammogram shows {COMPOSITION[exam['density']][1]}."]
    for side in "RL":
        lines = _side_findings(exam, side, rng, with_side=True)
        if lines:
            parts += [x[0].lower() + x[1:] for x in lines]
        else:
            parts.append(_negatives(rng, f"in the {SIDE_WORD[side]} breast").lower())
    parts.append(f"bi-rads {exam['exam_birads'].lower()}. " + ASSESSMENT[exam["exam_birads"]][1].lower())
    return " ".join(parts)


_WRITERS = {
    "us_screening": _us_screening,
    "per_breast": _per_breast,
    "single_image": _single_image,
    "free_text": _free_text,
}


def report_labels(exam: dict, style: str) -> Labels:
    """The structured labels (docs/design.md section 4) a report of this style states."""
    findings: dict[str, dict[str, str]] = {}
    for side in SIDES:
        kinds = {x["type"] for x in exam["breasts"][side]["lesions"]}
        states = dict.fromkeys(kinds, "pos")
        if not kinds and style != "single_image":
            states.update(dict.fromkeys(NEGATIVE_SET, "neg"))
        findings[side] = states
    birads = {s: exam["breasts"][s]["birads"] for s in SIDES}
    return Labels.make(exam["density"], {**birads, "exam": exam["exam_birads"]}, findings)


def write_report(exam: dict, style: str, rng: np.random.Generator) -> str:
    """Narrative report of ``exam`` in ``style`` (one of ``REPORT_STYLES``)."""
    if style not in _WRITERS:
        raise ValueError(f"unknown report style {style!r}; choose from {REPORT_STYLES}")
    return _WRITERS[style](exam, rng)
