"""Metrics on small cases with known values; NLG equals pycocoevalcap on the same tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from evaluation.clinical import birads_macro_f1_codes, paired_bootstrap, per_exam_scores, point_metrics
from evaluation.evaluate import evaluate_files
from evaluation.hallucination import exam_checks
from evaluation.nlg import nlg_metrics, tokenize
from mammorg.io import MammorgError
from mammorg.schema import StructuredReport


def _s(density, exam, findings=None):
    return StructuredReport.from_json(
        {
            "density": density,
            "birads": {"L": None, "R": None, "exam": exam},
            "findings": {"L": {}, "R": {}, "U": {}, **(findings or {})},
        }
    )


def test_clinical_known_values():
    refs = [
        _s("a", "1"),
        _s("b", "4B", {"R": {"mass": "pos"}}),
        _s("c", "2", {"L": {"calcification": "pos"}}),
    ]
    preds = [
        _s("a", "1"),
        _s("b", "4A", {"R": {"mass": "pos"}}),
        _s("d", "2", {"R": {"calcification": "pos"}}),
    ]
    m = point_metrics(preds, refs)
    assert m["birads_acc"] == pytest.approx(2 / 3)
    # per class F1 over reference classes {1, 2, 4B}: 1, 1, 0 → macro 2/3
    assert m["birads_f1"] == pytest.approx(2 / 3)
    assert m["density_acc"] == pytest.approx(2 / 3)
    # findings: tp=1 (R mass), fp=1 (R calc), fn=1 (L calc) → F1 = 2/4
    assert m["finding_f1"] == pytest.approx(0.5)
    assert m["per_finding"]["calcification"] == {"tp": 0, "fp": 1, "fn": 1, "f1": 0.0}


def test_nlg_equals_pycocoevalcap():
    preds = ["There is a 5 mm mass, right breast.", "No suspicious calcifications."]
    refs = ["There is a 6 mm mass in the right breast.", "No suspicious calcifications seen."]
    ours = nlg_metrics(preds, refs, meteor=False)
    gts = {i: [tokenize(r)] for i, r in enumerate(refs)}
    res = {i: [tokenize(p)] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert ours["bleu_1"] == pytest.approx(bleu[0]) and ours["bleu_4"] == pytest.approx(bleu[3])
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert tokenize("BI-RADS 4B, 2.5 cm.") == "bi - rads 4b , 2.5 cm ."
    assert nlg_metrics(refs, refs, meteor=False)["bleu_1"] == pytest.approx(1.0)


def test_hallucination_checks():
    ref = _s("a", "4B", {"R": {"mass": "pos"}})
    pred = _s("a", "1", {"L": {"mass": "pos", "calcification": "pos"}})
    checks = exam_checks(pred, ref, "Stable mass.", "Mass.")
    assert checks == {
        "wrong_side": 1,
        "invented_finding": 1,
        "invented_prior": 1,
        "birads_inconsistent": 1,
        "management_inconsistent": 0,
        "category_name_inconsistent": 0,
        "repetitive": 0,
    }
    looped = "Left Breast: A mass is seen.\nLeft Breast: A mass is seen in the breast.\nOPINION: BI-RADS 4A."
    assert exam_checks(pred, ref, looped, "Mass.")["repetitive"] == 1
    again = "FINDINGS:\nA mass.\nCalcifications are seen in the breast. Calcifications are seen in the breast."
    assert exam_checks(pred, ref, again, "Mass.")["repetitive"] == 1
    assert exam_checks(pred, ref, "Right Breast: No mass.\nLeft Breast: No mass.", "Mass.")["repetitive"] == 0
    wrapped = "An oval mass suggests a benign\nlesion (BIRADS 3). Another one suggests a benign\nlesion (BIRADS 3)."
    assert exam_checks(pred, ref, wrapped, "Mass.")["repetitive"] == 0  # a real report (DMID) wraps its lines


def test_paired_bootstrap_detects_a_better_system():
    refs = [_s("a", str(1 + i % 3)) for i in range(60)]
    good = [_s("a", r.birads["exam"]) for r in refs]
    bad = [_s("a", "1") for _ in refs]
    out = paired_bootstrap(per_exam_scores(good, refs), per_exam_scores(bad, refs), n=300)
    assert out["birads_acc"]["delta"] == pytest.approx(2 / 3) and out["birads_acc"]["p_value"] < 0.01


def test_paired_bootstrap_tests_rouge_and_cider_per_report():
    from evaluation.nlg import nlg_metrics, nlg_per_exam
    from evaluation.parser import parse_report

    refs = [f"There is a {10 + i} mm oval mass in the right breast. BI-RADS {1 + i % 4}." for i in range(40)]
    close = [r.replace("oval", "round") for r in refs]
    far = ["The breasts are fatty. No mass." for _ in refs]
    a, b = nlg_per_exam(close, refs), nlg_per_exam(far, refs)
    corpus = nlg_metrics(close, refs, meteor=False)
    assert a["rouge_l"].mean() == pytest.approx(corpus["rouge_l"]) and a["cider"].mean() == pytest.approx(
        corpus["cider"]
    )
    parsed = {name: [parse_report(t) for t in texts] for name, texts in (("ref", refs), ("a", close), ("b", far))}
    clinical = {name: per_exam_scores(parsed[name], parsed["ref"]) for name in ("a", "b")}
    out = paired_bootstrap({**clinical["a"], **a}, {**clinical["b"], **b}, n=200)
    assert out["rouge_l"]["delta"] > 0.3 and out["rouge_l"]["p_value"] < 0.01
    assert out["cider"]["delta"] > 0 and out["cider"]["p_value"] < 0.01


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_files_and_bad_input(tmp_path):
    ref = _jsonl(
        tmp_path / "ref.jsonl",
        [{"id": "1", "text": "ACR B. BI-RADS 1."}, {"id": "2", "text": "ACR C. Right mass. BI-RADS 4B."}],
    )
    pred = _jsonl(
        tmp_path / "pred.jsonl",
        [{"id": "2", "text": "ACR C. Right mass. BI-RADS 4B."}, {"id": "1", "text": "ACR B. BI-RADS 1."}],
    )
    m = evaluate_files(pred, ref, tmp_path / "out", pred_b_path=ref, bootstrap=20, meteor=False)
    assert m["birads_acc"] == 1.0 and m["density_f1"] == 1.0 and m["finding_f1"] == 1.0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in (
        "bleu_1",
        "bleu_4",
        "meteor",
        "rouge_l",
        "cider",
        "birads_f1",
        "birads_acc",
        "density_f1",
        "finding_f1",
        "per_finding",
    ):
        assert key in saved
    assert (tmp_path / "out" / "index.html").exists() and (tmp_path / "out" / "confusion_birads.png").exists()
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "1", "text": "a"}, {"id": "1", "text": "b"}])
    with pytest.raises(MammorgError, match="duplicate id"):
        evaluate_files(dup, ref, tmp_path / "o2")
    empty = _jsonl(tmp_path / "empty.jsonl", [{"id": "1", "text": " "}, {"id": "2", "text": "x"}])
    with pytest.raises(MammorgError, match="empty text"):
        evaluate_files(ref, empty, tmp_path / "o3")  # an empty reference is an error
    assert (
        evaluate_files(empty, empty_ref_ok(tmp_path), tmp_path / "o4", bootstrap=5, meteor=False)["empty_predictions"]
        == 1
    )  # an empty generation is scored
    short = _jsonl(tmp_path / "short.jsonl", [{"id": "1", "text": "x"}])
    with pytest.raises(MammorgError, match="ids differ"):
        evaluate_files(short, ref, tmp_path / "o4")
    (tmp_path / "bin.jsonl").write_bytes(b'{"id": "1", "text": "\xff"}\n')
    with pytest.raises(MammorgError, match="not valid UTF-8"):
        evaluate_files(tmp_path / "bin.jsonl", ref, tmp_path / "o5")
    assert not math.isnan(m["bleu_1"])


def empty_ref_ok(tmp_path):
    return _jsonl(tmp_path / "ref_ok.jsonl", [{"id": "1", "text": "BI-RADS 1."}, {"id": "2", "text": "BI-RADS 2."}])


def test_vectorised_birads_f1_matches_macro_f1_and_bootstraps():
    rng = np.random.default_rng(0)
    classes = ["1", "2", "3", "4A", "4B", "5", None]
    refs = [_s("a", classes[i]) for i in rng.integers(0, 7, 200)]
    preds = [_s("a", classes[i]) for i in rng.integers(0, 7, 200)]
    scores = per_exam_scores(preds, refs)
    expected = point_metrics(preds, refs)["birads_f1"]
    assert birads_macro_f1_codes(scores["birads_ref"], scores["birads_pred"]) == pytest.approx(expected)
    good = per_exam_scores(refs, refs)
    out = paired_bootstrap(good, scores, n=200)
    assert out["birads_f1"]["delta"] == pytest.approx(1.0 - expected) and out["birads_f1"]["p_value"] < 0.01
    with pytest.raises(ValueError, match="different references"):
        paired_bootstrap(good, per_exam_scores(refs, preds), n=10)
