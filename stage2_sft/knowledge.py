"""Knowledge tokens from stage-1 predictions (or gold labels): the knowledge state, its spelling
as discrete tokens, assessment plans, and soft mixes.

A ``KnowledgeState`` holds stage 1's probabilities and decisions for one exam (or a batch) as
tensors. The decisions are stage 1's labels at its operating points (``pred`` of a prediction),
so the discrete tokens state what stage 1 concluded, not a plain argmax of imbalanced
probabilities. ``KnowledgeVocabulary`` is the one place the tokens are spelled
(``<density=c> <conf:high> <R:birads=4B> <R:mass> <L:no_finding>``, plans
``<plan> <L:birads=1> <R:birads=4B> </plan>``). ``SoftKnowledge`` turns a state into one
embedding per head (and per finding) mixed from learned class embeddings, filled into
``<knowledge>`` placeholders.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS, SIDES, birads_class_mask, side_views
from mammorg.schema import Labels, Stage1Prediction

CONFIDENCE = (("low", 0.5), ("mid", 0.8), ("high", 1.01))  # bucket: upper bound of max prob
QUADRANTS = ("upper outer", "upper inner", "lower outer", "lower inner")  # location tokens
DEPTHS = ("anterior", "middle", "posterior")
SIDE_WORDS = {"L": "left", "R": "right", "exam": "overall"}
DESCRIPTOR_NAMES = tuple(DESCRIPTORS)  # mass_shape, mass_margin, calc_morphology, calc_distribution
DESCRIBES = {
    "mass_shape": "mass",
    "mass_margin": "mass",
    "calc_morphology": "calcification",
    "calc_distribution": "calcification",
}
SOFT_SLOTS = 1 + 2 + 2 * len(FINDINGS)  # density, BI-RADS per side, each finding per side
PLAN_SIDES = (*SIDES, "exam")
HEAD_FIELDS = {
    "density": ("density",),
    "birads": ("birads", "birads_label"),
    "findings": ("findings", "finding_on", "location", "clock", "depth", "descriptor"),
}  # the state fields of each stage-1 head


class KnowledgeVocabulary:
    """Spelling of every knowledge and plan token."""

    PLAN, PLAN_END = "<plan>", "</plan>"

    @staticmethod
    def density(value: str) -> str:
        return f"<density={value}>"

    @staticmethod
    def birads(side: str, category: str) -> str:
        """``side``: L, R or exam (plans only)."""
        return f"<{side}:birads={category}>"

    @staticmethod
    def finding(side: str, finding: str) -> str:
        return f"<{side}:{finding}>"

    @staticmethod
    def no_finding(side: str) -> str:
        return f"<{side}:no_finding>"

    @staticmethod
    def not_imaged(side: str) -> str:
        return f"<{side}:not_imaged>"

    @staticmethod
    def location(quadrant: str) -> str:
        """``<loc:upper_outer>``: where the finding before it is (stage 1's grounding)."""
        return f"<loc:{quadrant.replace(' ', '_')}>"

    @staticmethod
    def descriptor(side: str, name: str, value: str) -> str:
        """``<R:mass_margin=spiculated>``: a lesion descriptor of stage 1 (or of the labels)."""
        return f"<{side}:{name}={value.replace(' ', '_')}>"

    @staticmethod
    def confidence(p: float) -> str:
        return next(f"<conf:{name}>" for name, hi in CONFIDENCE if p < hi)

    @classmethod
    def discrete(cls) -> list[str]:
        """Every token the discrete knowledge mode can emit."""
        tokens = [cls.density(d) for d in DENSITIES]
        tokens += [cls.birads(s, c) for s in SIDES for c in BIRADS_CLASSES]
        tokens += [cls.finding(s, f) for s in SIDES for f in FINDINGS]
        tokens += [cls.no_finding(s) for s in SIDES] + [cls.not_imaged(s) for s in SIDES]
        tokens += [cls.location(q) for q in QUADRANTS]
        tokens += [cls.descriptor(s, n, v) for s in SIDES for n, values in DESCRIPTORS.items() for v in values]
        return tokens + [f"<conf:{name}>" for name, _ in CONFIDENCE]

    @classmethod
    def plan_extra(cls) -> list[str]:
        """Tokens of an assessment plan beyond the discrete ones: its brackets and exam categories."""
        return [cls.PLAN, cls.PLAN_END, *(cls.birads("exam", c) for c in BIRADS_CLASSES)]

    @classmethod
    def all(cls) -> list[str]:
        return cls.discrete() + cls.plan_extra()

    @classmethod
    def plan_categories(cls) -> list[list[str]]:
        """``[L, R, exam] x BIRADS_CLASSES`` plan category tokens."""
        return [[cls.birads(s, c) for c in BIRADS_CLASSES] for s in PLAN_SIDES]

    @classmethod
    def plan(cls, birads: dict[str, str | None], findings: Iterable[tuple[str, str]] | None = None) -> list[str]:
        """The assessment plan of a report from the categories it states (``{"L", "R", "exam"}``,
        as parsed): ``<plan> <L:birads=1> <R:birads=4B> </plan>``; the exam category only when no
        breast has its own. A category outside ``BIRADS_CLASSES`` (a bare "4") is left out. With
        ``findings`` (``(side, finding)`` pairs the report states), the finding tokens follow the
        categories in ``plan_findings`` order: ``... <R:birads=4B> <R:mass> </plan>``."""
        sides = [cls.birads(s, str(birads[s])) for s in SIDES if birads.get(s) in BIRADS_CLASSES]
        if not sides and birads.get("exam") in BIRADS_CLASSES:
            sides = [cls.birads("exam", str(birads["exam"]))]
        stated = set(findings or ())
        named = [cls.finding(s, f) for s, f in cls.plan_finding_pairs() if (s, f) in stated]
        return [cls.PLAN, *sides, *named, cls.PLAN_END]

    @staticmethod
    def plan_finding_pairs() -> list[tuple[str, str]]:
        """The order of a plan's findings: the left breast's, then the right's, each in ``FINDINGS`` order."""
        return [(s, f) for s in SIDES for f in FINDINGS]

    @classmethod
    def plan_findings(cls) -> list[str]:
        return [cls.finding(s, f) for s, f in cls.plan_finding_pairs()]

    @classmethod
    def verbal_forms(cls, lexicon: Any) -> dict[str, str]:
        """The words a discrete token stands for, as reports write them (``<R:birads=4B>`` ->
        ``BI-RADS 4B``, ``<L:mass>`` -> ``mass``, ``<density=c>`` -> ``heterogeneously dense``).
        Tokens without a report wording (confidence, no finding, not imaged) are absent."""
        by_label = {(k, v): term.term for term in lexicon.terms for k, v in term.label.items()}
        forms = {cls.density(d): by_label.get(("density", d), f"density {d}") for d in DENSITIES}
        for side in SIDES:
            forms.update({cls.birads(side, c): f"BI-RADS {c}" for c in BIRADS_CLASSES})
            forms.update({cls.finding(side, f): by_label.get(("finding", f), f.replace("_", " ")) for f in FINDINGS})
        forms.update({cls.location(q): f"{q} quadrant" for q in QUADRANTS})
        for side in SIDES:
            forms.update({cls.descriptor(side, n, v): v for n, values in DESCRIPTORS.items() for v in values})
        return forms

    @classmethod
    def words(cls, lexicon: Any) -> dict[str, str]:
        """Plain words for every knowledge and plan token, side included (``<R:mass>`` -> ``right
        mass``, ``<L:no_finding>`` -> ``left no findings``, ``<plan>`` -> ``assessment``): the mean
        embedding of their pieces starts the token's row in a pretrained vocabulary, so that the
        decoder reads a knowledge token as the words it stands for from the first step."""
        forms = cls.verbal_forms(lexicon)
        words = {cls.density(d): forms[cls.density(d)] for d in DENSITIES}
        for side in (*SIDES, "exam"):
            name = SIDE_WORDS[side]
            words.update({cls.birads(side, c): f"{name} BI-RADS {c}" for c in BIRADS_CLASSES})
            if side == "exam":
                continue
            words.update({cls.finding(side, f): f"{name} {forms[cls.finding(side, f)]}" for f in FINDINGS})
            words[cls.no_finding(side)] = f"{name} no findings"
            words[cls.not_imaged(side)] = f"{name} not imaged"
            values = [(n, v) for n, vs in DESCRIPTORS.items() for v in vs]
            words.update({cls.descriptor(side, n, v): f"{name} {v}" for n, v in values})
        words.update({cls.location(q): forms[cls.location(q)] for q in QUADRANTS})
        words.update({f"<conf:{name}>": f"{name} confidence" for name, _ in CONFIDENCE})
        words.update({cls.PLAN: "assessment", cls.PLAN_END: "end of assessment"})
        return words


@dataclass
class KnowledgeState:
    """Stage 1's view of one exam as tensors (a batch adds a leading dimension): probabilities
    ``density [4]``, ``birads [2, 9]``, ``findings [2, 7]``; ``sides [2]`` (breast imaged);
    decisions ``birads_label [2]`` (class index, -1: none) and ``finding_on [2, 7]`` (0/1);
    ``location [2, 7]``: the quadrant index (``QUADRANTS``) where a finding is, ``clock [2, 7]``
    its clock position (1 to 12) and ``depth [2, 7]`` its depth (``DEPTHS`` index), -1 unknown;
    ``descriptor [2, 4]``: the value index of each descriptor (``DESCRIPTOR_NAMES``), -1 none."""

    density: torch.Tensor
    birads: torch.Tensor
    findings: torch.Tensor
    sides: torch.Tensor
    birads_label: torch.Tensor
    finding_on: torch.Tensor
    location: torch.Tensor
    clock: torch.Tensor
    depth: torch.Tensor
    descriptor: torch.Tensor

    @classmethod
    def from_prediction(cls, record: Stage1Prediction) -> KnowledgeState:
        """The state of one ``stage1 predict`` record (probabilities and ``pred`` labels)."""
        probs, pred = record.probs, record.pred
        birads = torch.zeros(2, len(BIRADS_CLASSES))
        findings = torch.zeros(2, len(FINDINGS))
        sides = torch.zeros(2)
        label = torch.full((2,), -1, dtype=torch.long)
        finding_on = torch.zeros(2, len(FINDINGS))
        for i, side in enumerate(SIDES):
            side_birads, side_findings = probs.birads.get(side), probs.findings.get(side)
            if side_birads is None or side_findings is None:
                continue
            birads[i] = torch.tensor([side_birads[c] for c in BIRADS_CLASSES])
            findings[i] = torch.tensor([side_findings[f] for f in FINDINGS])
            sides[i] = 1.0
            label[i] = BIRADS_CLASSES.index(str(pred.birads[side]))
            finding_on[i] = torch.tensor([float(pred.findings[side].get(f) == "pos") for f in FINDINGS])
        where = _locations([(g.side, g.finding, g.location) for g in record.grounded])
        density = torch.tensor([probs.density[d] for d in DENSITIES])
        return cls(density, birads, findings, sides, label, finding_on, *where, _descriptors(pred.descriptors))

    @classmethod
    def from_labels(
        cls, labels: Labels, views: dict[str, str | None], locations: list[dict[str, Any]] | None = None
    ) -> KnowledgeState:
        """Oracle state from manifest labels (``source: gold``); ``unc`` counts as 0.5; finding
        locations from the reference report as parsed (``StructuredReport.locations``)."""
        density = torch.zeros(len(DENSITIES))
        if labels.density in DENSITIES:
            density[DENSITIES.index(labels.density)] = 1.0
        birads = torch.zeros(2, len(BIRADS_CLASSES))
        findings = torch.zeros(2, len(FINDINGS))
        sides = torch.zeros(2)
        for i, side in enumerate(SIDES):
            sides[i] = float(any(views.get(v) for v in side_views(side)))
            mask = torch.tensor(birads_class_mask(labels.birads.get(side)), dtype=torch.float)
            if mask.sum():
                birads[i] = mask / mask.sum()  # a bare "4" spreads over 4A/4B/4C
            states = labels.findings.get(side) or {}
            findings[i] = torch.tensor([{"pos": 1.0, "unc": 0.5}.get(states.get(f, ""), 0.0) for f in FINDINGS])
        label = torch.where(birads.sum(1) > 0, birads.argmax(1), -1)
        where = _locations([(x.get("side"), x.get("finding"), x) for x in locations or []])
        descriptor = _descriptors(labels.descriptors)
        return cls(density, birads, findings, sides, label, (findings >= 0.5).float(), *where, descriptor)

    def with_heads_from(self, gold: KnowledgeState, heads: tuple[str, ...]) -> KnowledgeState:
        """This state with the fields of ``heads`` (density, birads, findings) taken from ``gold``."""
        taken = {name for head in heads for name in HEAD_FIELDS[head]}
        return KnowledgeState(**{f.name: getattr(gold if f.name in taken else self, f.name) for f in fields(self)})

    @classmethod
    def stack(cls, states: list[KnowledgeState]) -> KnowledgeState:
        return cls(**{f.name: torch.stack([getattr(s, f.name) for s in states]) for f in fields(cls)})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> KnowledgeState:
        """On ``device``; ``dtype`` applies to the floating-point fields."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return KnowledgeState(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def tokens(self, confidence: bool = True, locations: bool = True) -> list[str]:
        """The discrete tokens of one exam's state: ``<density=c> <conf:high> <L:birads=1>
        <conf:high> <L:no_finding> <R:birads=4B> <R:mass> <conf:mid> <loc:upper_outer> ...``;
        without ``confidence`` no ``<conf:...>``, without ``locations`` no ``<loc:...>``."""
        vocab = KnowledgeVocabulary
        out: list[str] = []

        def stated(token: str, p: float) -> None:
            out.append(token)
            if confidence:
                out.append(vocab.confidence(p))

        if self.density.sum() > 0:
            top, index = self.density.max(0)
            stated(vocab.density(DENSITIES[int(index)]), float(top))
        for i, side in enumerate(SIDES):
            if not self.sides[i]:
                out.append(vocab.not_imaged(side))
                continue
            label = int(self.birads_label[i])
            if label >= 0:
                stated(vocab.birads(side, BIRADS_CLASSES[label]), float(self.birads[i, label]))
            found = [(j, float(q)) for j, (q, on) in enumerate(zip(self.findings[i], self.finding_on[i])) if on]
            for j, q in found:
                stated(vocab.finding(side, FINDINGS[j]), q)
                where = int(self.location[i, j])
                if locations and where >= 0:
                    out.append(vocab.location(QUADRANTS[where]))
                for k, name in enumerate(DESCRIPTOR_NAMES):
                    value = int(self.descriptor[i, k])
                    if DESCRIBES[name] == FINDINGS[j] and value >= 0:
                        out.append(vocab.descriptor(side, name, DESCRIPTORS[name][value]))
            if not found:
                out.append(vocab.no_finding(side))
        return out

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> KnowledgeState:
        indices = ("birads_label", "location", "clock", "depth", "descriptor")
        dtypes = dict.fromkeys(indices, torch.long)
        unknown = [[-1] * len(FINDINGS)] * 2
        defaults = {"location": unknown, "clock": unknown, "depth": unknown}
        defaults["descriptor"] = [[-1] * len(DESCRIPTOR_NAMES)] * 2
        raw = {**defaults, **raw}  # states saved before locations and descriptors
        return cls(**{f.name: torch.tensor(raw[f.name], dtype=dtypes.get(f.name, torch.float)) for f in fields(cls)})


def _descriptors(values: dict[str, dict[str, str]] | None) -> torch.Tensor:
    """``[2, 4]`` value indices of the descriptors per side (-1: none)."""
    out = torch.full((2, len(DESCRIPTOR_NAMES)), -1, dtype=torch.long)
    for i, side in enumerate(SIDES):
        for k, name in enumerate(DESCRIPTOR_NAMES):
            value = ((values or {}).get(side) or {}).get(name)
            if value in DESCRIPTORS[name]:
                out[i, k] = DESCRIPTORS[name].index(value)
    return out


def _locations(items: list[tuple[Any, Any, dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[2, F]`` quadrant indices, clock positions and depth indices from (side, finding,
    location) triples, -1 where unknown; for each field the first location that states it wins.
    Quadrants are named as stage 1 names them ("upper outer") or as the parser reads them from a
    report ("upper outer quadrant"): both are the same location token."""
    quadrants, clocks, depths = (torch.full((2, len(FINDINGS)), -1, dtype=torch.long) for _ in range(3))
    for side, finding, where in items:
        if side not in SIDES or finding not in FINDINGS:
            continue
        i, j = SIDES.index(side), FINDINGS.index(finding)
        quadrant = str(where.get("quadrant") or "").strip().lower().removesuffix(" quadrant")
        clock, depth = where.get("clock"), str(where.get("depth") or "").strip().lower()
        if quadrants[i, j] < 0 and quadrant in QUADRANTS:
            quadrants[i, j] = QUADRANTS.index(quadrant)
        if clocks[i, j] < 0 and isinstance(clock, int) and 1 <= clock <= 12:
            clocks[i, j] = clock
        if depths[i, j] < 0 and depth in DEPTHS:
            depths[i, j] = DEPTHS.index(depth)
    return quadrants, clocks, depths


class SoftKnowledge(nn.Module):
    """Probability-weighted mixes of learned class embeddings: ``SOFT_SLOTS`` vectors per exam."""

    def __init__(self, hidden: int):
        super().__init__()
        self.density = nn.Parameter(torch.randn(len(DENSITIES), hidden) * 0.02)
        self.birads = nn.Parameter(torch.randn(2, len(BIRADS_CLASSES), hidden) * 0.02)
        self.finding_pos = nn.Parameter(torch.randn(2, len(FINDINGS), hidden) * 0.02)
        self.finding_neg = nn.Parameter(torch.randn(2, len(FINDINGS), hidden) * 0.02)

    def forward(self, state: KnowledgeState) -> torch.Tensor:
        """``[B, SOFT_SLOTS, H]`` from a batched state (``density [B,4]``, ``birads [B,2,9]``, ...)."""
        dens = state.density @ self.density  # [B, H]
        bir = torch.einsum("bsc,sch->bsh", state.birads, self.birads)  # [B, 2, H]
        side = state.sides[..., None, None]
        p = state.findings[..., None]
        find = (p * self.finding_pos + (1 - p) * self.finding_neg) * side  # a breast not imaged: zeros
        return torch.cat([dens[:, None], bir, find.flatten(1, 2)], dim=1)
