"""Knowledge tokens from stage-1 predictions (or gold labels): discrete tokens and soft mixes.

A *knowledge state* is a dict of probability tensors and of stage 1's decisions::

    {"density": [4], "birads": [2, 9], "findings": [2, 7], "sides": [2],   # sides: breast imaged
     "birads_label": [2] (class index, -1: none), "finding_on": [2, 7] (0/1)}

The decisions are stage 1's labels at its operating points (``pred`` of a prediction line), so
the discrete tokens state what stage 1 concluded, not a plain argmax of imbalanced probabilities.
``discrete`` turns a state into special tokens (``<density=c> <conf:high> <R:birads=4B> ...``);
``soft`` turns it into one embedding per head (and per finding) mixed from learned class
embeddings, filled into ``<knowledge>`` placeholders.
"""
from __future__ import annotations

import torch
from torch import nn

from mammorg.labels import BIRADS_CLASSES, DENSITIES, FINDINGS, birads_class_mask

MODES = ("none", "discrete", "soft", "both")
SOURCES = ("predicted", "gold")
HEAD_KEYS = {"density": ("density",), "birads": ("birads", "birads_label"),
             "findings": ("findings", "finding_on")}  # the state entries of each stage-1 head
CONFIDENCE = (("low", 0.5), ("mid", 0.8), ("high", 1.01))  # bucket: upper bound of max prob
SOFT_SLOTS = 1 + 2 + 2 * len(FINDINGS)  # density, BI-RADS per side, each finding per side


def discrete_vocabulary() -> list[str]:
    """Every special token the discrete knowledge mode can emit."""
    tokens = [f"<density={d}>" for d in DENSITIES]
    tokens += [f"<{s}:birads={c}>" for s in "LR" for c in BIRADS_CLASSES]
    tokens += [f"<{s}:{f}>" for s in "LR" for f in FINDINGS]
    tokens += [f"<{s}:no_finding>" for s in "LR"] + [f"<{s}:not_imaged>" for s in "LR"]
    return tokens + [f"<conf:{name}>" for name, _ in CONFIDENCE]


PLAN, PLAN_END = "<plan>", "</plan>"


def plan_vocabulary() -> list[str]:
    """Tokens of an assessment plan beyond the discrete ones: its brackets and exam categories."""
    return [PLAN, PLAN_END, *(f"<exam:birads={c}>" for c in BIRADS_CLASSES)]


def plan_category_tokens() -> list[str]:
    """The tokens by which a plan states a category: per breast and for the exam."""
    return [f"<{s}:birads={c}>" for s in ("L", "R", "exam") for c in BIRADS_CLASSES]


def plan_tokens(birads: dict) -> list[str]:
    """The assessment plan of a report from the BI-RADS categories it states (``{"L", "R",
    "exam"}``, as parsed): ``<plan> <L:birads=1> <R:birads=4B> </plan>``; the exam category
    only when no breast has its own. A category outside ``BIRADS_CLASSES`` (a bare "4") is left out."""
    sides = [f"<{s}:birads={birads[s]}>" for s in "LR" if birads.get(s) in BIRADS_CLASSES]
    if not sides and birads.get("exam") in BIRADS_CLASSES:
        sides = [f"<exam:birads={birads['exam']}>"]
    return [PLAN, *sides, PLAN_END]


def verbal_forms(lexicon) -> dict[str, str]:
    """The words a discrete token stands for, as reports write them (``<R:birads=4B>`` →
    ``BI-RADS 4B``, ``<L:mass>`` → ``mass``, ``<density=c>`` → ``heterogeneously dense``).
    Tokens without a report wording (confidence, no finding, not imaged) are absent."""
    by_label = {(k, v): term.term for term in lexicon.terms for k, v in term.label.items()}
    forms = {f"<density={d}>": by_label.get(("density", d), f"density {d}") for d in DENSITIES}
    for side in "LR":
        forms.update({f"<{side}:birads={c}>": f"BI-RADS {c}" for c in BIRADS_CLASSES})
        forms.update({f"<{side}:{f}>": by_label.get(("finding", f), f.replace("_", " ")) for f in FINDINGS})
    return forms


def _confidence(p: float) -> str:
    return next(f"<conf:{name}>" for name, hi in CONFIDENCE if p < hi)


def state_from_prediction(record: dict) -> dict[str, torch.Tensor]:
    """Knowledge state from one ``stage1 predict`` line (probabilities and ``pred`` labels)."""
    probs, pred = record["probs"], record["pred"]
    birads = torch.zeros(2, len(BIRADS_CLASSES))
    findings = torch.zeros(2, len(FINDINGS))
    sides = torch.zeros(2)
    label = torch.full((2,), -1, dtype=torch.long)
    finding_on = torch.zeros(2, len(FINDINGS))
    for i, side in enumerate("LR"):
        if probs["birads"].get(side) is not None:
            birads[i] = torch.tensor([probs["birads"][side][c] for c in BIRADS_CLASSES])
            findings[i] = torch.tensor([probs["findings"][side][f] for f in FINDINGS])
            sides[i] = 1.0
            label[i] = BIRADS_CLASSES.index(pred["birads"][side])
            finding_on[i] = torch.tensor([float(pred["findings"][side].get(f) == "pos") for f in FINDINGS])
    return {"density": torch.tensor([probs["density"][d] for d in DENSITIES]), "birads": birads,
            "findings": findings, "sides": sides, "birads_label": label, "finding_on": finding_on}


def state_from_labels(labels: dict, views: dict) -> dict[str, torch.Tensor]:
    """Oracle knowledge state from manifest labels (``source: gold``); ``unc`` counts as 0.5."""
    density = torch.zeros(len(DENSITIES))
    if labels.get("density") in DENSITIES:
        density[DENSITIES.index(labels["density"])] = 1.0
    birads = torch.zeros(2, len(BIRADS_CLASSES))
    findings = torch.zeros(2, len(FINDINGS))
    sides = torch.zeros(2)
    for i, side in enumerate("LR"):
        sides[i] = float(any(views.get(f"{side}_{p}") for p in ("CC", "MLO")))
        mask = torch.tensor(birads_class_mask((labels.get("birads") or {}).get(side)), dtype=torch.float)
        if mask.sum():
            birads[i] = mask / mask.sum()  # a bare "4" spreads over 4A/4B/4C
        states = (labels.get("findings") or {}).get(side) or {}
        findings[i] = torch.tensor([{"pos": 1.0, "unc": 0.5}.get(states.get(f), 0.0) for f in FINDINGS])
    label = torch.where(birads.sum(1) > 0, birads.argmax(1), -1)
    return {"density": density, "birads": birads, "findings": findings, "sides": sides,
            "birads_label": label, "finding_on": (findings >= 0.5).float()}


def with_gold_heads(predicted: dict[str, torch.Tensor], gold: dict[str, torch.Tensor],
                    heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``predicted`` with the entries of ``heads`` (keys of ``HEAD_KEYS``) taken from ``gold``."""
    return {**predicted, **{key: gold[key] for head in heads for key in HEAD_KEYS[head]}}


def discrete_tokens(state: dict[str, torch.Tensor], confidence: bool = True) -> list[str]:
    """``<density=c> <conf:high> <L:birads=1> <conf:high> <L:no_finding> <R:birads=4B> ...``;
    without ``confidence`` the ``<conf:...>`` tokens are left out."""
    conf = _confidence if confidence else (lambda p: None)
    out = []
    if state["density"].sum() > 0:
        p, k = state["density"].max(0)
        out += [f"<density={DENSITIES[int(k)]}>", conf(float(p))]
    for i, side in enumerate("LR"):
        if not state["sides"][i]:
            out.append(f"<{side}:not_imaged>")
            continue
        k = int(state["birads_label"][i])
        if k >= 0:
            out += [f"<{side}:birads={BIRADS_CLASSES[k]}>", conf(float(state["birads"][i, k]))]
        found = [(f, float(p)) for f, p, on in zip(FINDINGS, state["findings"][i], state["finding_on"][i])
                 if on]
        for name, p in found:
            out += [f"<{side}:{name}>", conf(p)]
        if not found:
            out.append(f"<{side}:no_finding>")
    return [t for t in out if t is not None]


class SoftKnowledge(nn.Module):
    """Probability-weighted mixes of learned class embeddings: ``SOFT_SLOTS`` vectors per exam."""

    def __init__(self, hidden: int):
        super().__init__()
        self.density = nn.Parameter(torch.randn(len(DENSITIES), hidden) * 0.02)
        self.birads = nn.Parameter(torch.randn(2, len(BIRADS_CLASSES), hidden) * 0.02)
        self.finding_pos = nn.Parameter(torch.randn(2, len(FINDINGS), hidden) * 0.02)
        self.finding_neg = nn.Parameter(torch.randn(2, len(FINDINGS), hidden) * 0.02)

    def forward(self, density: torch.Tensor, birads: torch.Tensor, findings: torch.Tensor,
                sides: torch.Tensor) -> torch.Tensor:
        """``[B, SOFT_SLOTS, H]`` from ``density [B,4]``, ``birads [B,2,9]``, ``findings [B,2,7]``."""
        dens = density @ self.density  # [B, H]
        bir = torch.einsum("bsc,sch->bsh", birads, self.birads)  # [B, 2, H]
        side = sides[..., None, None]
        find = (findings[..., None] * self.finding_pos + (1 - findings[..., None]) * self.finding_neg)
        find = (find * side).flatten(1, 2)  # [B, 14, H]; a breast not imaged contributes zeros
        return torch.cat([dens[:, None], bir, find], dim=1)
