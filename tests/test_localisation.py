"""Localising stage 1 (issue #19): boxes from the generator through preprocessing, heatmap
targets, localisation metrics, grounded findings and location knowledge tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ingest_vindr

from evaluation.parser import parse_report
from mammorg.geometry import box_to_cache, box_to_original, point_to_cache, point_to_original
from mammorg.io import read_jsonl
from mammorg.labels import FINDINGS, VIEWS
from mammorg.preprocess import PreprocessSpec, normalise_geometry
from mammorg.schema import Box, Exam, GroundedFinding, HeadProbabilities, Labels, Stage1Prediction, StructuredReport
from stage1_classification.data import augment, box_tensors
from stage1_classification.localisation import (
    box_targets,
    localisation_metrics,
    location_from_views,
    peak_box,
    peak_centres,
)
from stage1_classification.model import MultiViewClassifier, stage1_loss


def _breast(flip: bool) -> tuple[np.ndarray, Box]:
    """A breast-like image (chest wall bright at the left, or right when ``flip``) with a bright
    square lesion; the lesion's box."""
    img = np.zeros((200, 120), dtype=np.float32)
    yy, xx = np.mgrid[0:200, 0:120]
    img[((xx / 100) ** 2 + ((yy - 100) / 80) ** 2) <= 1] = 0.4
    img[60:80, 30:45] = 1.0
    box = Box(30, 60, 45, 80)
    if flip:
        img = img[:, ::-1].copy()
        box = Box(120 - 45, 60, 120 - 30, 80)
    return img, box


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_follow_the_preprocessing_geometry(flip):
    img, box = _breast(flip)
    out, geometry = normalise_geometry(img, PreprocessSpec(128, 64))
    cached = box_to_cache(box, geometry)
    ys, xs = np.nonzero(out > 0.8)
    assert abs(xs.min() - cached.xmin) <= 1.5 and abs(xs.max() + 1 - cached.xmax) <= 1.5
    assert abs(ys.min() - cached.ymin) <= 1.5 and abs(ys.max() + 1 - cached.ymax) <= 1.5
    back = box_to_original(cached, geometry)
    assert np.allclose(back.to_json(), box.to_json(), atol=1e-3)
    x, y = point_to_original(*point_to_cache(10.0, 20.0, geometry), geometry)
    assert abs(x - 10) < 1e-6 and abs(y - 20) < 1e-6


def test_synthetic_boxes_reach_the_manifest(synth_dir, tmp_path):
    ingest_vindr(synth_dir, tmp_path / "m.jsonl")
    rows = [Exam.from_json(r) for r in read_jsonl(tmp_path / "m.jsonl")]
    boxed = 0
    for exam in rows:
        for side in ("L", "R"):
            drawn = {f for f, v in exam.labels.findings[side].items() if v == "pos"}
            drawn -= {"skin_thickening"}  # the skin line has no box
            on_side = {x.finding for x in exam.lesions if x.side == side and x.box is not None}
            assert drawn == on_side, (exam.exam_id, side)
        for lesion in exam.lesions:
            b = lesion.box
            assert b is not None and 0 <= b.xmin < b.xmax <= 64 and 0 <= b.ymin < b.ymax <= 128
            boxed += 1
    assert boxed > 0


def test_a_retracted_nipple_is_boxed_where_it_is_drawn():
    from mammorg.synth.phantom import render_view_with_boxes

    mass = {"type": "mass", "shape": "irregular", "margin": "spiculated", "density": "high", "size_mm": 20}
    mass.update(quadrant="upper outer", clock=1, depth="middle", nipple_distance_cm=5.0)
    truth = {"true_density": "a", "breasts": {"L": {"lesions": [mass, {"type": "nipple_retraction"}]}}}
    plain = {"true_density": "a", "breasts": {"L": {"lesions": [mass]}}}
    img, boxes = render_view_with_boxes(truth, "L_CC", 256, 128, np.random.default_rng(0))
    ref, ref_boxes = render_view_with_boxes(plain, "L_CC", 256, 128, np.random.default_rng(0))
    assert [i for i, _ in boxes] == [0, 1] and [i for i, _ in ref_boxes] == [0]
    x0, y0, x1, y1 = (round(v) for v in boxes[1][1])
    changed = np.argwhere(np.abs(img - ref) > 0.05)  # the same draws but the nipple: it changed
    assert len(changed) and (changed[:, 0] >= y0 - 1).all() and (changed[:, 0] <= y1).all()
    assert (changed[:, 1] >= x0 - 1).all() and (changed[:, 1] <= x1).all()
    assert 0 < x1 - x0 < 20 and 0 < y1 - y0 < 20 and x0 > 64  # a small box at the nipple, far from the chest wall


def _known(view: int, finding: str) -> torch.Tensor:
    known = torch.zeros(1, 4, len(FINDINGS), dtype=torch.bool)
    known[0, view, FINDINGS.index(finding)] = True
    return known


def _batch(box: list[float], finding: str = "mass", view: int = 0) -> dict:
    boxes = torch.full((1, 4, 8, 5), -1.0)
    boxes[0, view, 0] = torch.tensor([FINDINGS.index(finding), *box])
    return {
        "images": torch.zeros(1, 4, 1, 64, 32),
        "view_mask": torch.ones(1, 4, dtype=torch.bool),
        "boxes": boxes,
        "box_known": _known(view, finding),
    }


def test_box_targets_mark_the_overlapped_cells():
    target = box_targets(_batch([4, 20, 12, 30])["boxes"], (64, 32), (8, 4))
    mass = target[0, 0, FINDINGS.index("mass")]
    assert mass.sum() == 4 and mass[2:4, 0:2].all()  # rows 16-32 px, columns 0-16 px
    assert target.sum() == mass.sum()


def test_pointing_game_and_froc():
    batch = _batch([4, 20, 12, 30])
    heat = torch.full((1, 4, len(FINDINGS), 8, 4), -5.0)
    heat[0, 0, FINDINGS.index("mass"), 3, 1] = 5.0  # inside the box
    good = localisation_metrics([{"heatmaps": heat}], [batch])
    assert good["pointing_game"]["mass"] == 1.0 and good["froc_sensitivity_at_1fp"]["mass"] == 1.0
    heat[0, 0, FINDINGS.index("mass"), 3, 1] = -5.0
    heat[0, 0, FINDINGS.index("mass"), 7, 3] = 5.0  # far from it
    bad = localisation_metrics([{"heatmaps": heat}], [batch])
    assert bad["pointing_game"]["mass"] == 0.0


def test_localisation_loss_only_where_known_and_falls_with_training():
    torch.manual_seed(0)
    model = MultiViewClassifier("resnet10t", 32, (2, 2), 4, 0.0, localise=True)
    batch = _batch([4, 20, 12, 30])
    batch["images"][0, 0, 0, 20:30, 4:12] = 1.0
    batch.update(
        density=torch.tensor([-1]),
        birads_mask=torch.zeros(1, 2, 9, dtype=torch.bool),
        findings=torch.zeros(1, 2, len(FINDINGS)),
        finding_mask=torch.zeros(1, 2, len(FINDINGS)),
    )
    out = model(batch["images"], batch["view_mask"])
    assert out["heatmaps"].shape[:3] == (1, 4, len(FINDINGS)) and out["findings"].shape == (1, 2, len(FINDINGS))
    unknown = dict(batch, box_known=torch.zeros_like(batch["box_known"]))
    assert stage1_loss(out, unknown).item() == pytest.approx(0.0, abs=1e-6)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(8):
        loss = stage1_loss(model(batch["images"], batch["view_mask"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("pooling", ["lse", "topk", "attention"])
def test_mil_poolings_ignore_missing_views(pooling):
    model = MultiViewClassifier("resnet10t", 32, (2, 2), 4, 0.0, localise=True, mil_pooling=pooling).eval()
    images = torch.rand(1, 4, 1, 64, 32)
    mask = torch.tensor([[True, True, False, False]])
    a = model(images, mask)["findings"]
    images[0, 2:] = torch.rand(2, 1, 64, 32)  # the missing right views change nothing
    assert torch.allclose(a, model(images, mask)["findings"])


def test_lesion_features_read_where_the_heatmap_points():
    model = MultiViewClassifier("resnet10t", 16, (2, 2), 2, 0.0, localise=True, lesion_features=True).eval()
    h, w = 4, 2
    maps = torch.randn(3, 512, h, w)  # the feature maps of three present views (L_CC, L_MLO, R_CC)
    present = torch.tensor([[True, True, True, False]])
    heat = torch.full((1, 2, len(FINDINGS), 2 * h * w), -20.0)
    heat[0, 0, FINDINGS.index("mass"), h * w + 5] = 20.0  # the left mass: cell 5 of the MLO view
    valid = torch.tensor([[True] * (2 * h * w), [True] * (h * w) + [False] * (h * w)]).unsqueeze(0)
    heat[0, 1, FINDINGS.index("mass"), h * w + 1] = 20.0  # a peak on the missing R_MLO counts for nothing
    lesions = model._lesions(maps, present, heat, valid)
    assert lesions.shape == (1, 2, len(FINDINGS), 16 + 2)
    cell = maps[1].flatten(1)[:, 5]  # row 2, column 1 of the MLO view
    assert torch.allclose(lesions[0, 0, FINDINGS.index("mass"), :16], model.lesion_proj(cell), atol=1e-4)
    assert lesions[0, 0, FINDINGS.index("mass"), 16:].tolist() == pytest.approx([2 / 3, 1.0])
    right_cells = model.lesion_proj(maps[2].flatten(1).T).mean(0)  # flat logits on R_CC: its mean cell
    assert torch.allclose(lesions[0, 1, FINDINGS.index("mass"), :16], right_cells, atol=1e-4)
    images = torch.rand(1, 4, 1, 64, 32)
    out = MultiViewClassifier(
        "resnet10t", 16, (2, 2), 2, 0.0, descriptor_heads=True, localise=True, lesion_features=True
    )(images, torch.tensor([[True, True, False, False]]))
    assert out["birads"].shape == (1, 2, 9) and out["desc_mass_margin"].shape == (1, 2, 5)
    with pytest.raises(ValueError, match="need localise"):
        MultiViewClassifier("resnet10t", 16, (2, 2), 2, lesion_features=True)


def test_lesion_crops_cut_the_view_where_the_lesion_is():
    """The crops are cut around the box centre in training and the heatmap's peak otherwise,
    at the input's resolution; the descriptor heads read the crop of their finding."""
    from stage1_classification.model import LesionCrops

    crops = LesionCrops(8, size=16, fraction=0.25)
    seen: list[torch.Tensor] = []

    class Keep(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.flatten(1)[:, :8]

    crops.encoder = Keep()
    images = torch.zeros(1, 4, 1, 64, 32)
    images[0, 0, 0, 40:44, 8:12] = 1.0  # a bright lesion on L_CC centred at (x 10, y 42)
    heat = torch.full((1, 4, len(FINDINGS), 8, 4), -5.0)
    heat[0, 0, FINDINGS.index("calcification"), 1, 3] = 5.0  # the calcification's top cell: row 1, column 3
    boxes = torch.full((1, 4, 8, 5), -1.0)
    boxes[0, 0, 0] = torch.tensor([FINDINGS.index("mass"), 8.0, 40.0, 12.0, 44.0])
    present = torch.tensor([[True, True, False, False]])
    out = crops(images, present, heat, boxes)
    assert out.shape == (1, 2, 2, 8)
    mass_crop, calc_crop = seen[0][0, 0], seen[0][1, 0]  # L_CC's crops: mass, calcification
    assert mass_crop[6:10, 6:10].mean() > 0.5  # at its centre, at the same scale (16 of 64 rows in 16 pixels)
    assert float(mass_crop.sum()) == pytest.approx(float(images.sum()), rel=0.3)
    assert float(calc_crop.sum()) == 0.0  # cut at row 1, column 3: far from the lesion
    centre = crops.centres(heat, None, (64, 32))[0, 0, 1]
    assert centre.tolist() == pytest.approx([3.5 / 4, 1.5 / 8], abs=1e-3)  # a lone hot cell: its centre
    model = MultiViewClassifier(
        "resnet10t", 16, (2, 2), 2, 0.0, descriptor_heads=True, localise=True, lesion_crops=True
    )
    out = model(torch.rand(2, 4, 1, 64, 32), torch.ones(2, 4, dtype=torch.bool), boxes.expand(2, -1, -1, -1))
    assert out["birads"].shape == (2, 2, 9) and out["desc_calc_morphology"].shape == (2, 2, 9)
    with pytest.raises(ValueError, match="need localise"):
        MultiViewClassifier("resnet10t", 16, (2, 2), 2, lesion_crops=True)


def test_training_crops_shift_off_the_box_centres_within_the_jitter():
    """``train.crop_jitter``: each box moves by up to the spread (in crop sides) along x and y,
    the same along both of its corners (its size kept); its finding stays."""
    from stage1_classification.model import LesionCrops

    crops = LesionCrops(8, size=16, fraction=0.25)  # a crop's side: 16 of 64 rows
    boxes = torch.tensor([[2.0, 8.0, 40.0, 12.0, 44.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]).expand(500, 2, 5)
    torch.manual_seed(0)
    moved = crops.shifted(boxes, 64, 0.2)
    offset = moved[..., 1:3] - boxes[..., 1:3]
    assert torch.equal(moved[..., 0], boxes[..., 0])
    assert torch.allclose(moved[..., 3:] - moved[..., 1:3], boxes[..., 3:] - boxes[..., 1:3])
    assert offset.abs().max() <= 0.2 * 16 + 1e-5 and offset.abs().max() > 0.15 * 16  # spread over the range
    assert abs(float(offset.mean())) < 0.3 and torch.equal(crops.shifted(boxes, 64, 0.0), boxes)


def test_augmentation_moves_boxes_with_the_image():
    exam_boxes = torch.full((4, 8, 5), -1.0)
    exam_boxes[0, 0] = torch.tensor([0.0, 10, 10, 20, 20])
    sample = {
        "images": torch.zeros(4, 1, 64, 32),
        "view_mask": torch.ones(4, dtype=torch.bool),
        "boxes": exam_boxes,
        "box_known": torch.zeros(4, len(FINDINGS), dtype=torch.bool),
        "birads_mask": torch.zeros(2, 9, dtype=torch.bool),
        "findings": torch.zeros(2, len(FINDINGS)),
        "finding_mask": torch.zeros(2, len(FINDINGS)),
    }
    sample["images"][0, 0, 10:20, 10:20] = 1.0
    for seed in range(6):
        out = augment(sample, np.random.default_rng(seed))
        view = int(torch.nonzero(out["boxes"][:, 0, 0] >= 0)[0])
        x0, y0, x1, y1 = (int(v) for v in out["boxes"][view, 0, 1:])
        inside = out["images"][view, 0, y0:y1, x0:x1]
        assert inside.numel() and inside.min() > 0.5  # the lesion is where its box says


def test_box_tensors_from_an_exam(synth_dir, tmp_path):
    from mammorg.preprocess import preprocess_manifest
    from mammorg.schema import read_manifest

    ingest_vindr(synth_dir, tmp_path / "m.jsonl")
    preprocess_manifest(tmp_path / "m.jsonl", tmp_path / "cache", PreprocessSpec(64, 32), workers=1, progress=False)
    exam = next(e for e in read_manifest(tmp_path / "cache" / "manifest.jsonl") if e.lesions)
    t = box_tensors(exam)
    lesion = exam.lesions[0]
    v, f = VIEWS.index(lesion.view), FINDINGS.index(lesion.finding)
    assert t["box_known"][v, f] and (t["boxes"][v, :, 0] == f).any()
    row = t["boxes"][v][t["boxes"][v, :, 0] == f][0]
    assert 0 <= row[1] < row[3] <= 32 and 0 <= row[2] < row[4] <= 64


def test_peak_box_and_locations():
    prob = torch.zeros(8, 4)
    prob[2, 1], prob[2, 2], prob[6, 0] = 0.9, 0.6, 0.3
    score, box = peak_box(prob, (64, 32))
    assert score == pytest.approx(0.9) and box == (8.0, 16.0, 24.0, 24.0)
    left = location_from_views("L", cc=(0.5, 0.2), mlo=(0.5, 0.2))  # lateral, upper
    assert left["quadrant"] == "upper outer" and left["clock"] in (1, 2) and left["depth"] == "middle"
    right = location_from_views("R", cc=(0.2, 0.8), mlo=(0.2, 0.8))  # medial, lower, near the chest wall
    assert right["quadrant"] == "lower inner" and right["clock"] in (4, 5) and right["depth"] == "posterior"
    assert location_from_views("R", cc=None, mlo=(0.9, 0.3)) == {"side": "R", "depth": "anterior", "quadrant": "upper"}


def test_location_knowledge_tokens_and_location_f1():
    from evaluation.clinical import point_metrics
    from stage2_sft.knowledge import KnowledgeState, KnowledgeVocabulary

    probs = HeadProbabilities(
        {"a": 0.1, "b": 0.7, "c": 0.1, "d": 0.1},
        {"L": dict.fromkeys(("0", "1", "2", "3", "4A", "4B", "4C", "5", "6"), 0.0) | {"4B": 1.0}, "R": None},
        {"L": dict.fromkeys(FINDINGS, 0.1) | {"mass": 0.9}, "R": None},
    )
    pred = Labels.make("b", {"L": "4B", "R": None}, {"L": {"mass": "pos"}, "R": {}})
    where = {"side": "L", "quadrant": "upper outer", "clock": 2, "depth": "middle"}
    grounded = [GroundedFinding("L", "mass", 0.9, "L_CC", Box(1, 2, 3, 4), where)]
    state = KnowledgeState.from_prediction(Stage1Prediction("e", ["L_CC", "L_MLO"], probs, pred, grounded=grounded))
    tokens = state.tokens(confidence=False)
    assert tokens[tokens.index("<L:mass>") + 1] == KnowledgeVocabulary.location("upper outer") == "<loc:upper_outer>"
    assert "<loc:upper_outer>" not in state.tokens(confidence=False, locations=False)
    assert "<loc:upper_outer>" in KnowledgeVocabulary.discrete()
    gold = KnowledgeState.from_labels(
        pred, {"L_CC": "x"}, [{"side": "L", "finding": "mass", "quadrant": "lower inner"}]
    )
    assert "<loc:lower_inner>" in gold.tokens()
    # gold locations as training reads them: parsed from the reference report ("... quadrant")
    parsed = parse_report("Left breast: A mass is seen in the lower inner quadrant at 7 o'clock. BI-RADS 4B.")
    assert parsed.locations and parsed.locations[0]["quadrant"] == "lower inner quadrant"
    from_report = KnowledgeState.from_labels(pred, {"L_CC": "x"}, parsed.locations).tokens(confidence=False)
    assert from_report[from_report.index("<L:mass>") + 1] == "<loc:lower_inner>"
    assert KnowledgeState.from_json(state.to_json()).tokens() == state.tokens()
    # the clock position and depth (generate.locations: stage1 writes them), -1 where unknown
    mass = FINDINGS.index("mass")
    assert (int(state.clock[0, mass]), int(state.depth[0, mass])) == (2, 1) and int(state.clock[1, mass]) == -1
    gold = KnowledgeState.from_labels(pred, {"L_CC": "x"}, parsed.locations)
    assert (int(gold.location[0, mass]), int(gold.clock[0, mass]), int(gold.depth[0, mass])) == (3, 7, -1)
    two = [
        {"side": "L", "finding": "mass", "depth": "posterior"},
        {"side": "L", "finding": "mass", "quadrant": "upper inner"},
    ]
    both = KnowledgeState.from_labels(pred, {"L_CC": "x"}, two)  # each field from the first that states it
    assert (int(both.location[0, mass]), int(both.depth[0, mass])) == (1, 2)
    old = {k: v for k, v in state.to_json().items() if k not in ("clock", "depth")}  # saved before them
    assert int(KnowledgeState.from_json(old).clock[0, mass]) == -1

    ref = StructuredReport.from_json(
        {
            "density": "b",
            "birads": {"L": "4B", "R": None, "exam": "4B"},
            "findings": {"L": {"mass": "pos"}, "R": {}, "U": {}},
            "locations": [{"side": "L", "finding": "mass", "quadrant": "upper outer"}],
        }
    )
    wrong = StructuredReport.from_json(
        {**ref.to_json(), "locations": [{"side": "L", "finding": "mass", "quadrant": "lower inner"}]}
    )
    assert point_metrics([ref], [ref])["location_finding_f1"] == 1.0
    assert point_metrics([wrong], [ref])["location_finding_f1"] == 0.0
    assert point_metrics([wrong], [ref])["finding_f1"] == 1.0


def test_predictions_carry_grounded_findings_in_original_pixels(stage1_outputs):
    """End to end: a localising stage-1 run's predictions hold, per positive finding, its view,
    a box inside the original image, a score and a location; the feature files hold heatmaps."""
    from safetensors.torch import load_file

    from mammorg.schema import read_manifest, read_predictions

    exams = {e.exam_id: e for e in read_manifest(stage1_outputs / "cache" / "manifest.jsonl")}
    records = read_predictions(stage1_outputs / "s1" / "pred.jsonl")
    grounded = [(r, g) for r in records for g in r.grounded]
    positives = sum(v == "pos" for r in records for s in ("L", "R") for v in r.pred.findings[s].values())
    assert len(grounded) == positives > 0
    for record, g in grounded:
        assert g.view in record.views and g.view.startswith(g.side) and 0 <= g.score <= 1
        height, width = exams[record.exam_id].geometry[g.view]["source_shape"]
        assert g.box is not None and 0 <= g.box.xmin < g.box.xmax <= width and 0 <= g.box.ymin < g.box.ymax <= height
        assert g.location["side"] == g.side and "depth" in g.location
    feats = load_file(str(stage1_outputs / "s1" / records[0].features))
    assert feats["heatmaps"].shape[:2] == (4, len(FINDINGS))


def test_crop_reader_windows_shift_within_a_wider_cut():
    """The crop reader cuts a margin around each crop at the same scale; its centre window is the
    plain crop, and a training window is a shifted one of the crop's size."""
    from stage1_classification.crop_reader import _window
    from stage1_classification.model import LesionCrops

    crops = LesionCrops(8, size=16, fraction=0.25)
    images = torch.rand(1, 4, 1, 64, 32)
    centre = torch.rand(1, 4, 2, 2) * 0.5 + 0.25
    plain, wide = crops.cut(images, centre), crops.cut(images, centre, margin=4)
    assert wide.shape[-2:] == (24, 24)
    assert torch.allclose(_window(wide, 16, None), plain, atol=1e-5)
    shifted = _window(wide, 16, torch.Generator().manual_seed(0))
    assert shifted.shape == plain.shape and not torch.allclose(shifted, plain)


def test_peak_centres_move_within_the_hottest_cell():
    heat = torch.full((2, 4, 4), -10.0)
    heat[0, 1, 2] = 5.0  # one hot cell, cold neighbours: its centre
    heat[1, 0, 0] = heat[1, 0, 1] = 5.0  # two equal cells in a row, at the map's corner
    centre = peak_centres(heat)
    assert torch.allclose(centre[0], torch.tensor([2.5 / 4, 1.5 / 4]), atol=1e-4)
    # halfway between the two cells; the padding outside the map does not pull the point
    assert torch.allclose(centre[1], torch.tensor([1.0 / 4, 0.5 / 4]), atol=1e-4)
    assert peak_centres(torch.randn(3, 2, 5, 8, 4)).shape == (3, 2, 5, 2)
