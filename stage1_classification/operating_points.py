"""Decision rules of stage 1, fitted on the validation split after training.

Argmax over the BI-RADS probabilities of a model trained on imbalanced labels almost always
names the majority class, and a fixed 0.5 threshold on rare findings almost never fires. The
operating points turn probabilities into labels the way a reader would want them:

- BI-RADS: ``argmax(log p - tau * log prior)``, the prior being the mean predicted distribution
  on the validation breasts; ``tau`` (0 = plain argmax) maximises validation macro-F1; a
  category with fewer than ``MIN_PRIOR_LABELS`` validation labels is not lifted.
- Findings: one threshold per finding maximising validation F1 (0.5 where the validation split
  has no positive, or where no threshold clearly beats calling every breast positive), then
  adjusted together to maximise the pooled F1 over all findings, the measure reports are scored
  with: a weak finding is decided only where its calls are worth their false alarms (its own
  optimum calls it almost everywhere: architectural distortion on the knowledge benchmark, 610
  calls on 462 test breasts at 12% precision).
- Categories follow the findings (``birads_follow_findings``): a breast's category is the best
  one that agrees with its decided findings (BI-RADS 1 only without a finding, 4A and above only
  with one), so stage 1 never states "negative" beside a mass it found; ``tau`` is fitted under
  the same rule. The two heads otherwise contradict each other on small or short-trained models.

They are saved as ``operating_points.json`` in the run folder; a run without the file decides
by plain argmax and 0.5 (categories following findings); a file written before the rule existed
keeps plain category decisions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from mammorg.io import MammorgError, write_json_atomic
from mammorg.labels import BIRADS_CLASSES, FINDINGS, birads_agrees_with_findings

FILENAME = "operating_points.json"
PRIOR_POWERS = tuple(np.round(np.arange(0.0, 1.51, 0.125), 3).tolist())
MIN_PRIOR_LABELS = 3  # validation labels a category needs before the prior adjustment lifts it
THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.025), 3).tolist())
# [without a finding, with one] x classes: the categories a breast may take
AGREES = np.array([[birads_agrees_with_findings(c, found) for c in BIRADS_CLASSES] for found in (False, True)])


def _agreeing(log_p: np.ndarray, any_finding: np.ndarray | None) -> np.ndarray:
    """``log_p [N, 9]`` with the categories that disagree with each breast's findings at -inf."""
    return log_p if any_finding is None else np.where(AGREES[any_finding.astype(int)], log_p, -np.inf)


@dataclass(frozen=True)
class OperatingPoints:
    birads_prior_power: float = 0.0
    birads_log_prior: tuple[float, ...] = field(default=(0.0,) * len(BIRADS_CLASSES))
    finding_thresholds: tuple[float, ...] = field(default=(0.5,) * len(FINDINGS))
    birads_follow_findings: bool = True

    def birads_labels(self, probs: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
        """Class indices from probabilities ``[..., 9]``; with the finding decisions ``positive
        [..., 7]`` (and ``birads_follow_findings``) only categories that agree with them."""
        prior = torch.tensor(self.birads_log_prior, dtype=probs.dtype)
        score = probs.clamp_min(1e-8).log() - self.birads_prior_power * prior
        if positive is not None and self.birads_follow_findings:
            agrees = torch.from_numpy(AGREES)[positive.any(-1).long()]
            score = score.masked_fill(~agrees, float("-inf"))
        return score.argmax(-1)

    def finding_positive(self, probs: torch.Tensor) -> torch.Tensor:
        """Boolean decisions from probabilities ``[..., 7]``."""
        return probs >= torch.tensor(self.finding_thresholds, dtype=probs.dtype)

    def save(self, run_dir: str | Path) -> None:
        write_json_atomic(Path(run_dir) / FILENAME, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> OperatingPoints:
        """The run's operating points; argmax and 0.5 when it has none."""
        path = Path(run_dir) / FILENAME
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            points = cls(
                float(raw["birads_prior_power"]),
                tuple(map(float, raw["birads_log_prior"])),
                tuple(map(float, raw["finding_thresholds"])),
                bool(raw.get("birads_follow_findings", False)),  # files before the rule: plain decisions
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MammorgError(f"{path}: not an operating-points file ({exc})") from exc
        if len(points.birads_log_prior) != len(BIRADS_CLASSES) or len(points.finding_thresholds) != len(FINDINGS):
            raise MammorgError(
                f"{path}: expected {len(BIRADS_CLASSES)} BI-RADS priors and {len(FINDINGS)} finding thresholds"
            )
        return points


def _macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    return float(f1_score(labels, pred, average="macro", zero_division=0))


def fit_birads(
    probs: np.ndarray, labels: np.ndarray, any_finding: np.ndarray | None = None
) -> tuple[float, tuple[float, ...]]:
    """(tau, log prior) maximising macro-F1 on breasts with one exact label; ties keep small tau.
    ``any_finding [N]``: whether each breast has a decided finding (categories then follow it).
    A category with fewer than ``MIN_PRIOR_LABELS`` validation labels is not lifted (log prior
    0): its tiny mean probability would otherwise make it a frequent decision. Traced on the
    knowledge benchmark: one validation breast labelled BI-RADS 6 (label noise) and 14 breasts
    decided 6 by the adjustment, each stated as "BI-RADS 6" in the reports."""
    log_prior = np.log(probs.mean(0).clip(1e-8))
    seen = np.bincount(labels, minlength=probs.shape[1]) >= MIN_PRIOR_LABELS
    log_prior = np.where(seen, log_prior, 0.0)
    log_p = _agreeing(np.log(probs.clip(1e-8)), any_finding)
    scores = [_macro_f1(labels, (log_p - tau * log_prior).argmax(1)) for tau in PRIOR_POWERS]
    best = int(np.argmax(scores))  # first maximum: the smallest adjustment that reaches it
    return float(PRIOR_POWERS[best]), tuple(log_prior.tolist())


def fit_threshold(probs: np.ndarray, labels: np.ndarray, min_gain: float = 0.05) -> float:
    """The threshold maximising F1 of one finding; 0.5 without a positive label, or when the best
    F1 beats calling every breast positive by less than ``min_gain`` (a finding the model cannot
    tell apart would otherwise be "found" everywhere)."""
    if labels.sum() == 0 or len(labels) == 0:
        return 0.5
    pred = probs[None, :] >= np.asarray(THRESHOLDS)[:, None]  # [thresholds, breasts]
    tp = (pred & (labels[None] == 1)).sum(1)
    f1 = 2 * tp / (pred.sum(1) + labels.sum())
    all_positive = 2 * labels.sum() / (len(labels) + labels.sum())
    if f1.max() < all_positive + min_gain:
        return 0.5
    return float(THRESHOLDS[int(np.argmax(f1))])


def _counts(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, calls) of one finding at every threshold of ``THRESHOLDS``."""
    pred = probs[None, :] >= np.asarray(THRESHOLDS)[:, None]
    return (pred & (labels[None] == 1)).sum(1), pred.sum(1)


def fit_pooled_thresholds(
    probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, start: tuple[float, ...], rounds: int = 3
) -> tuple[float, ...]:
    """Thresholds ``[7]`` maximising the pooled F1 over all findings of the labelled breasts
    (``probs``, ``labels``, ``mask``: ``[N, 7]``), by coordinate ascent from ``start``; a finding
    without a positive label keeps its start (the split may simply lack it)."""
    grid = np.asarray(THRESHOLDS)
    counts = [_counts(probs[mask[:, j], j], labels[mask[:, j], j]) for j in range(len(FINDINGS))]
    tp, calls = np.stack([c[0] for c in counts]), np.stack([c[1] for c in counts])  # [7, G]
    positives = int(sum((labels[mask[:, j], j] == 1).sum() for j in range(len(FINDINGS))))
    tunable = [j for j in range(len(FINDINGS)) if (labels[mask[:, j], j] == 1).any()]
    at = [int(np.abs(grid - t).argmin()) for t in start]
    for _ in range(rounds):
        for j in tunable:
            other_tp = sum(tp[k, at[k]] for k in range(len(FINDINGS)) if k != j)
            other_calls = sum(calls[k, at[k]] for k in range(len(FINDINGS)) if k != j)
            f1 = 2 * (other_tp + tp[j]) / np.maximum(other_calls + calls[j] + positives, 1)
            at[j] = int(np.argmax(f1 + 1e-9 * (np.arange(len(grid)) == at[j])))  # ties keep the current one
    return tuple(float(start[j]) if j not in tunable else float(grid[at[j]]) for j in range(len(FINDINGS)))


def fit_operating_points(
    birads_probs: np.ndarray,
    birads_mask: np.ndarray,
    finding_probs: np.ndarray,
    finding_labels: np.ndarray,
    finding_mask: np.ndarray,
) -> OperatingPoints:
    """Operating points from validation breasts: ``birads_* [N, 9]``, ``finding_* [N, 7]``; the
    categories are fitted under the rule that they follow the findings decided first."""
    own = tuple(
        fit_threshold(finding_probs[finding_mask[:, j], j], finding_labels[finding_mask[:, j], j])
        for j in range(len(FINDINGS))
    )
    thresholds = fit_pooled_thresholds(finding_probs, finding_labels, finding_mask, own)
    any_finding: np.ndarray = np.any(finding_probs >= np.asarray(thresholds), axis=1)
    exact = birads_mask.sum(1) == 1
    tau, prior = (
        fit_birads(birads_probs[exact], birads_mask[exact].argmax(1), any_finding[exact])
        if exact.any()
        else (0.0, (0.0,) * len(BIRADS_CLASSES))
    )
    return OperatingPoints(tau, prior, thresholds)


def fit_from_outputs(outputs: list[dict], batches: list[dict]) -> OperatingPoints:
    """Operating points from the model outputs (logits) and label batches of a validation pass."""
    bir_p = torch.cat([o["birads"] for o in outputs]).float().softmax(-1).reshape(-1, len(BIRADS_CLASSES))
    f_p = torch.cat([o["findings"] for o in outputs]).float().sigmoid().reshape(-1, len(FINDINGS))
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("birads_mask", "findings", "finding_mask")}
    return fit_operating_points(
        bir_p.numpy(),
        cat["birads_mask"].reshape(-1, len(BIRADS_CLASSES)).numpy(),
        f_p.numpy(),
        cat["findings"].reshape(-1, len(FINDINGS)).numpy(),
        cat["finding_mask"].reshape(-1, len(FINDINGS)).numpy() > 0,
    )
