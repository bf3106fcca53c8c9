"""Stage-1 operating points: fitting on validation outputs, saving, and their use downstream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammorg.io import MammorgError
from mammorg.labels import BIRADS_CLASSES, FINDINGS
from mammorg.schema import Labels, Stage1Prediction
from stage1_classification.inference import exam_record
from stage1_classification.operating_points import (
    OperatingPoints,
    fit_birads,
    fit_operating_points,
    fit_threshold,
)
from stage2_sft.knowledge import KnowledgeState


def state_from_prediction(record: dict) -> KnowledgeState:
    return KnowledgeState.from_prediction(Stage1Prediction.from_json(record))


def state_from_labels(labels: dict, views: dict) -> KnowledgeState:
    return KnowledgeState.from_labels(Labels.from_json(labels), views)


def discrete_tokens(state: KnowledgeState, confidence: bool = True) -> list[str]:
    return state.tokens(confidence)


def _underconfident_minority(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that rank the true class well but never let a minority class win argmax."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([1, 2, 7], size=n, p=[0.7, 0.2, 0.1])
    prior = np.full(9, 0.01)
    prior[[1, 2, 7]] = [0.8, 0.12, 0.05]
    logits = np.log(prior)[None].repeat(n, 0) + rng.normal(0, 0.2, (n, 9))
    logits[np.arange(n), labels] += 1.2  # evidence for the true class, not enough to beat "1"
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True), labels


def test_birads_prior_adjustment_beats_argmax_macro_f1():
    from sklearn.metrics import f1_score

    probs, labels = _underconfident_minority()
    tau, log_prior = fit_birads(probs, labels)
    points = OperatingPoints(tau, log_prior)
    adjusted = points.birads_labels(torch.from_numpy(probs)).numpy()
    f1 = lambda pred: f1_score(labels, pred, average="macro", zero_division=0)
    assert tau > 0
    assert f1(adjusted) > f1(probs.argmax(1)) + 0.2
    probs2, labels2 = _underconfident_minority(seed=1)  # and it carries over to unseen breasts
    assert (
        f1_score(labels2, points.birads_labels(torch.from_numpy(probs2)).numpy(), average="macro")
        > f1_score(labels2, probs2.argmax(1), average="macro") + 0.2
    )


def test_birads_prior_adjustment_does_not_lift_a_category_without_labels():
    """A category the validation labels (almost) never name keeps no prior boost: its tiny mean
    probability made it a frequent decision (traced: BI-RADS 6 from one noisy label)."""
    probs, labels = _underconfident_minority()
    probs = probs.copy()
    probs[:, 8] = 1e-5  # "6": never the answer, its probability tiny
    probs /= probs.sum(1, keepdims=True)
    labels = labels.copy()
    labels[0] = 8  # one noisy label
    tau, log_prior = fit_birads(probs, labels)
    assert tau > 0 and log_prior[8] == 0.0
    decided = OperatingPoints(tau, log_prior).birads_labels(torch.from_numpy(probs)).numpy()
    assert not (decided == 8).any()


def test_threshold_separates_rare_positives_and_defaults_without_any():
    probs = np.array([0.05, 0.1, 0.12, 0.08, 0.3, 0.35])
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert 0.12 < fit_threshold(probs, labels) <= 0.3
    assert fit_threshold(probs, np.zeros(6)) == 0.5
    rng = np.random.default_rng(0)  # no skill: F1 would peak by calling every breast positive
    noise, labels = rng.random(300) * 0.2, (rng.random(300) < 0.4).astype(int)
    assert fit_threshold(noise, labels) == 0.5


def test_fit_ignores_unlabelled_breasts_and_ambiguous_birads():
    n = 40
    rng = np.random.default_rng(0)
    bir_p = rng.dirichlet(np.ones(9), n)
    bir_mask = np.zeros((n, 9))
    bir_mask[np.arange(n), bir_p.argmax(1)] = 1
    bir_mask[:5, 4:7] = 1  # a bare "4": not an exact label
    f_p = rng.random((n, len(FINDINGS)))
    f_y = (f_p > 0.7).astype(float)
    f_m = np.ones_like(f_y, dtype=bool)
    f_m[:, 1] = False  # calcification never labelled
    points = fit_operating_points(bir_p, bir_mask, f_p, f_y, f_m)
    assert points.birads_prior_power == 0.0  # argmax is already perfect on the exact labels
    assert points.finding_thresholds[1] == 0.5
    assert all(0.65 <= t <= 0.725 for j, t in enumerate(points.finding_thresholds) if j != 1)


def test_save_load_round_trip_and_bad_file(tmp_path):
    assert OperatingPoints.load(tmp_path) == OperatingPoints()
    points = OperatingPoints(0.5, tuple(np.linspace(-3, 0, 9)), (0.2,) * len(FINDINGS))
    points.save(tmp_path)
    assert OperatingPoints.load(tmp_path) == points
    (tmp_path / "operating_points.json").write_text('{"birads_prior_power": 1}')
    with pytest.raises(MammorgError, match="operating_points.json: not an operating-points file"):
        OperatingPoints.load(tmp_path)


def _record(points: OperatingPoints) -> dict:
    birads = torch.full((2, 9), 0.02)
    birads[:, 1], birads[1, BIRADS_CLASSES.index("4B")] = 0.6, 0.24  # R: "1" wins argmax
    findings = torch.full((2, len(FINDINGS)), 0.1)
    findings[1, 0] = 0.3  # R mass below 0.5
    return exam_record(
        "e",
        torch.tensor([0.1, 0.2, 0.6, 0.1]),
        birads,
        findings,
        torch.tensor([True, True, True, True]),
        points=points,
    ).to_json()


def test_prediction_labels_and_discrete_knowledge_follow_the_operating_points():
    plain = _record(OperatingPoints())
    assert plain["pred"]["birads"]["R"] == "1" and plain["pred"]["findings"]["R"]["mass"] == "neg"
    log_prior = [0.0] * 9
    log_prior[1] = np.log(4.0)  # "1" is four times as common as the evidence for 4B here
    tuned = _record(OperatingPoints(1.0, tuple(log_prior), (0.25,) * len(FINDINGS)))
    assert tuned["pred"]["birads"] == {"L": "1", "R": "4B", "exam": "4B"}
    assert tuned["pred"]["findings"]["R"]["mass"] == "pos"
    assert tuned["probs"] == plain["probs"]
    tokens = discrete_tokens(state_from_prediction(tuned))
    assert "<R:birads=4B>" in tokens and "<R:mass>" in tokens and "<L:no_finding>" in tokens
    assert tokens[tokens.index("<R:birads=4B>") + 1] == "<conf:low>"
    assert "<R:birads=1>" in discrete_tokens(state_from_prediction(plain))
    bare = discrete_tokens(state_from_prediction(tuned), confidence=False)
    assert bare == [t for t in tokens if not t.startswith("<conf:")]


def test_gold_state_decides_by_label():
    state = state_from_labels(
        {
            "density": "b",
            "birads": {"L": "2", "R": "4"},
            "findings": {"R": {"mass": "pos", "calcification": "unc"}},
        },
        {"L_CC": "a", "R_CC": "b"},
    )
    tokens = discrete_tokens(state)
    assert "<L:birads=2>" in tokens and "<R:birads=4A>" in tokens  # a bare 4 names its first subclass
    assert "<R:mass>" in tokens and "<R:calcification>" in tokens


def test_categories_follow_the_decided_findings():
    from mammorg.labels import birads_agrees_with_findings

    probs = torch.zeros(3, len(BIRADS_CLASSES))
    probs[:, BIRADS_CLASSES.index("1")] = 0.5  # the BI-RADS head says "negative" for every breast
    probs[:, BIRADS_CLASSES.index("4B")] = 0.3
    probs[:, BIRADS_CLASSES.index("2")] = 0.2
    found = torch.zeros(3, len(FINDINGS), dtype=torch.bool)
    found[0, 0] = True  # a mass: not negative; 4B (the next best) agrees with a finding
    points = OperatingPoints()
    labels = [BIRADS_CLASSES[i] for i in points.birads_labels(probs, found).tolist()]
    assert labels == ["4B", "1", "1"]
    probs[2, BIRADS_CLASSES.index("1")] = 0.0  # without a finding 4B is not allowed: 2 is next
    assert BIRADS_CLASSES[points.birads_labels(probs, found)[2]] == "2"
    plain = OperatingPoints(birads_follow_findings=False)
    assert BIRADS_CLASSES[plain.birads_labels(probs, found)[0]] == "1"  # the old rule: contradicts
    for c in BIRADS_CLASSES:  # the rule is the evaluation's consistency check
        assert birads_agrees_with_findings(c, True) == (c != "1")


def test_operating_points_files_before_the_rule_keep_plain_decisions(tmp_path):
    import json

    old = {"birads_prior_power": 0.0, "birads_log_prior": [0.0] * 9, "finding_thresholds": [0.5] * 7}
    (tmp_path / "operating_points.json").write_text(json.dumps(old))
    assert not OperatingPoints.load(tmp_path).birads_follow_findings
    OperatingPoints().save(tmp_path)
    assert OperatingPoints.load(tmp_path).birads_follow_findings


def test_exam_record_never_calls_a_breast_with_findings_negative():
    points = OperatingPoints(finding_thresholds=(0.3,) * len(FINDINGS))
    birads = torch.full((2, len(BIRADS_CLASSES)), 0.05)
    birads[:, BIRADS_CLASSES.index("1")] = 0.6
    findings = torch.zeros(2, len(FINDINGS))
    findings[1, 1] = 0.4  # right breast: calcification above its threshold
    record = exam_record("e", torch.full((4,), 0.25), birads, findings, torch.ones(4, dtype=torch.bool), None, points)
    assert record.pred.birads["L"] == "1" and record.pred.birads["R"] != "1"
    assert record.pred.findings["R"]["calcification"] == "pos"
