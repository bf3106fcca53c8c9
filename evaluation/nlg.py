"""NLG metrics with the pycocoevalcap scorers on lower-cased, punctuation-split text."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> str:
    """Lower-case and split punctuation off words (numbers keep their decimal point)."""
    return " ".join(_TOKEN.findall((text or "").lower()))


def _meteor(gts: dict, res: dict) -> float | None:
    if shutil.which("java") is None:
        warnings.warn("METEOR needs Java, which was not found; meteor reported as null", stacklevel=2)
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        finally:
            scorer.close() if hasattr(scorer, "close") else None
        return float(score)
    except Exception as exc:  # the Java subprocess fails in several ways
        warnings.warn(f"METEOR failed ({exc}); meteor reported as null", stacklevel=2)
        return None


def _pairs(preds: Sequence[str], refs: Sequence[str]) -> tuple[dict, dict]:
    gts = {i: [tokenize(r) or "."] for i, r in enumerate(refs)}
    res = {i: [tokenize(p) or "."] for i, p in enumerate(preds)}
    return gts, res


def nlg_per_exam(preds: Sequence[str], refs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-report ROUGE-L and CIDEr (their means are the corpus scores; CIDEr's document
    frequencies come from all ``refs``) for paired tests. BLEU is a corpus statistic, not a mean."""
    gts, res = _pairs(preds, refs)
    _, rouge = Rouge().compute_score(gts, res)
    _, cider = Cider().compute_score(gts, res)
    return {"rouge_l": np.asarray(rouge, dtype=float), "cider": np.asarray(cider, dtype=float)}


def nlg_metrics(preds: Sequence[str], refs: Sequence[str], meteor: bool = True) -> dict[str, float | None]:
    """BLEU-1..4, METEOR (null without Java), ROUGE-L and CIDEr over aligned pairs."""
    gts, res = _pairs(preds, refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, float | None] = {f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)}
    out.update(meteor=_meteor(gts, res) if meteor else None, rouge_l=float(rouge), cider=float(cider))
    return out
