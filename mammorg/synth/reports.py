"""Report text from exam truth, in several institutional styles, with matching labels."""

from __future__ import annotations

import numpy as np

from mammorg.labels import BIRADS_NAMES, SIDE_WORDS, SIDES
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
MANAGEMENT_TEXT = {
    "0": "Recall for additional imaging is recommended.",
    "1": "Routine screening mammography is recommended.",
    "2": "Routine screening mammography is recommended.",
    "3": "Short-interval follow-up mammography in 6 months is recommended.",
    "4": "Tissue diagnosis is recommended.",
    "4A": "Tissue diagnosis is recommended.",
    "4B": "Tissue diagnosis is recommended.",
    "4C": "Tissue diagnosis is recommended.",
    "5": "Tissue diagnosis is recommended.",
    "6": "Surgical excision is recommended when appropriate.",
}
ASSESSMENT = {c: (BIRADS_NAMES[c], management) for c, management in MANAGEMENT_TEXT.items()}
# The negatives a normal breast is described with; each becomes a "neg" label.
NEGATIVE_SET = ("mass", "calcification", "architectural_distortion")


def _location(lesion: dict, side: str | None) -> str:
    """Where a lesion is, from what is known of it: quadrant, clock, distance from the nipple,
    depth; the breast alone when none is known (reports written from labels)."""
    breast = f"the {SIDE_WORD[side]} breast" if side else "the breast"
    if "quadrant" not in lesion:
        return breast
    where = f"the {lesion['quadrant']} quadrant" if lesion["quadrant"] != "axillary tail" else "the axillary tail"
    if side:
        where += f" of {breast}"
    details = [
        f"at {lesion['clock']} o'clock" if "clock" in lesion else "",
        f"{lesion['nipple_distance_cm']} cm from the nipple" if "nipple_distance_cm" in lesion else "",
        f"{lesion['depth']} depth" if "depth" in lesion else "",
    ]
    return ", ".join([f"{where} {details[0]}".strip(), *[d for d in details[1:] if d]])


def _words(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def describe_lesion(lesion: dict, side: str | None, rng: np.random.Generator, mass_word: str = "mass") -> str:
    """One sentence for one lesion from the descriptors it has; ``side=None`` leaves laterality out."""
    kind = lesion["type"]
    loc = _location(lesion, side)
    if kind == "mass":
        lead = rng.choice(("There is a", "A", "Noted is a"))
        size = f"{lesion['size_mm']} mm" if "size_mm" in lesion else None
        density = f"{lesion['density']} density" if "density" in lesion else None
        margins = f" with {lesion['margin']} margins" if "margin" in lesion else ""
        phrase = _words(size, lesion.get("shape"), density, mass_word)
        if phrase[0] in "aeiou":  # "an irregular mass" (labels without a size)
            lead = lead[:-1] + "An" if lead == "A" else lead + "n"
        return f"{lead} {phrase}{margins} in {loc}."
    if kind == "calcification":
        morphology = lesion.get("morphology")
        dist = lesion.get("distribution")
        if morphology is None or dist is None:
            return f"{_words(morphology, 'calcifications').capitalize()} are seen in {loc}."
        return (
            f"{morphology.capitalize()} calcifications in a {dist} distribution are seen in {loc}."
            if dist not in ("scattered", "diffuse")
            else f"{morphology.capitalize()} calcifications are {dist} in "
            f"{'the ' + SIDE_WORD[side] + ' breast' if side else 'the breast'}."
        )
    if kind == "asymmetry":
        return f"{'A focal' if 'quadrant' in lesion else 'An'} asymmetry is seen in {loc}."
    if kind == "architectural_distortion":
        return f"Architectural distortion is present in {loc}."
    if kind == "lymph_node":
        if lesion.get("enlarged", True):
            where = f"the {SIDE_WORD[side]} axilla" if side else "the axilla"
            size = f" measuring {lesion['size_mm']} mm" if "size_mm" in lesion else ""
            return f"An enlarged axillary lymph node{size} is seen in {where}."
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
                f"No dominant mass, suspicious microcalcifications or architectural distortion {breast_label}.",
            )
        )
    )


def _side_findings(
    exam: dict, side: str, rng: np.random.Generator, with_side: bool, mass_word: str = "mass"
) -> list[str]:
    return [describe_lesion(x, side if with_side else None, rng, mass_word) for x in exam["breasts"][side]["lesions"]]


def _birads_line(rng: np.random.Generator, category: str) -> str:
    name, _ = ASSESSMENT[category]
    form = rng.choice(("BI-RADS Category {c}: {n}.", "BI-RADS {c} - {n}.", "BIRADS: {c} ({n})."))
    return form.format(c=category, n=name)


def _normal(exam: dict, side: str) -> bool:
    """A breast the report calls normal: no lesion, and known to have none (a breast without
    lesions in data that is not exhaustively annotated is left out of the report)."""
    breast = exam["breasts"][side]
    return not breast["lesions"] and breast.get("normal", True)


def _us_screening(exam: dict, rng: np.random.Generator) -> str:
    parts = ["BREAST COMPOSITION: " + COMPOSITION[exam["density"]][0]] if exam["density"] else []
    parts.append("FINDINGS:")
    normal = [s for s in "RL" if _normal(exam, s)]
    for side in "RL":
        parts += _side_findings(exam, side, rng, with_side=True)
    if len(normal) == 2:
        parts.append(_negatives(rng, "in either breast"))
    elif normal:
        parts.append(_negatives(rng, f"in the {SIDE_WORD[normal[0]]} breast"))
    parts.append("IMPRESSION:")
    for side in "RL":
        category = exam["breasts"][side]["birads"]
        if category and (exam["breasts"][side]["lesions"] or category != "1"):
            parts.append(f"{SIDE_WORD[side].capitalize()} breast: " + _birads_line(rng, category))
    if len(parts) and parts[-1] == "IMPRESSION:":
        parts.append("No mammographic evidence of malignancy.")
    parts.append("Overall: " + _birads_line(rng, exam["exam_birads"]))
    parts.append(ASSESSMENT[exam["exam_birads"]][1])
    return "\n".join(parts)


def _per_breast(exam: dict, rng: np.random.Generator) -> str:
    parts = [f"Breast composition: {COMPOSITION[exam['density']][0]}"] if exam["density"] else []
    for side in "RL":
        lines = _side_findings(exam, side, rng, with_side=False)
        if not lines and not _normal(exam, side):
            continue
        body = " ".join(lines) if lines else _negatives(rng, "").replace(" .", ".")
        parts.append(f"{SIDE_WORD[side].capitalize()} Breast: {body}")
    opinion = [
        f"{SIDE_WORD[s].capitalize()} breast BI-RADS {exam['breasts'][s]['birads']}."
        for s in "RL"
        if exam["breasts"][s]["birads"]
    ]
    parts.append("OPINION: " + " ".join(opinion) + " " + ASSESSMENT[exam["exam_birads"]][1])
    return "\n".join(parts)


def _single_image(exam: dict, rng: np.random.Generator) -> str:
    lines = [s for side in "RL" for s in _side_findings(exam, side, rng, False, "soft opacity")]
    findings = " ".join(lines) if lines else "No abnormal soft opacity or suspicious calcification seen."
    composition = (
        f"Breast Composition: {COMPOSITION[exam['density']][1].capitalize()} (ACR {exam['density'].upper()})\n"
        if exam["density"]
        else ""
    )
    return f"{composition}BIRADS: {exam['exam_birads']}\nFindings: {findings}"


def _free_text(exam: dict, rng: np.random.Generator) -> str:
    density = exam["density"]
    parts = [f"bilateral mammogram shows {COMPOSITION[density][1]}." if density else "bilateral mammogram."]
    for side in "RL":
        lines = _side_findings(exam, side, rng, with_side=True)
        if lines:
            parts += [x[0].lower() + x[1:] for x in lines]
        elif _normal(exam, side):
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
        kinds = list(dict.fromkeys(x["type"] for x in exam["breasts"][side]["lesions"]))  # first-seen order
        states = dict.fromkeys(kinds, "pos")
        if not kinds and style != "single_image" and exam["breasts"][side].get("normal", True):
            states.update(dict.fromkeys(NEGATIVE_SET, "neg"))
        findings[side] = states
    birads = {s: exam["breasts"][s]["birads"] for s in SIDES}
    return Labels.make(exam["density"], {**birads, "exam": exam["exam_birads"]}, findings)


def write_report(exam: dict, style: str, rng: np.random.Generator) -> str:
    """Narrative report of ``exam`` in ``style`` (one of ``REPORT_STYLES``)."""
    if style not in _WRITERS:
        raise ValueError(f"unknown report style {style!r}; choose from {REPORT_STYLES}")
    return _WRITERS[style](exam, rng)
