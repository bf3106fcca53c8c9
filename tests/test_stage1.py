"""Stage 1 end to end on a tiny config: train, resume with the same loss curve, masking."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ingest_vindr, train_stage1

from mammorg.config import load_config
from mammorg.labels import FINDINGS
from mammorg.preprocess import PreprocessSpec, preprocess_manifest
from stage1_classification.config import Stage1Config
from stage1_classification.metrics import selection_score
from stage1_classification.model import MultiViewClassifier
from stage1_classification.operating_points import OperatingPoints
from stage1_classification.predict import oof_folds
from stage1_classification.train import train as run


@pytest.fixture(scope="module")
def cache_manifest(synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("s1")
    ingest_vindr(synth_dir, root / "m.jsonl")
    preprocess_manifest(root / "m.jsonl", root / "cache", PreprocessSpec(64, 32), workers=1, progress=False)
    return root / "cache" / "manifest.jsonl"


def _losses(run_dir):
    return [json.loads(x)["train_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_and_exact_resume(cache_manifest, tmp_path):
    base = ["data.cache_manifest=" + str(cache_manifest), "data.val_split=train", "train.epochs=3"]
    full = load_config("stage1/tiny", Stage1Config, [*base, f"run_dir={tmp_path / 'a'}"])
    run(full)
    part = load_config("stage1/tiny", Stage1Config, [*base, f"run_dir={tmp_path / 'b'}", "train.stop_after_epochs=2"])
    run(part)
    resumed = load_config("stage1/tiny", Stage1Config, [*base, f"run_dir={tmp_path / 'b'}"])
    run(resumed)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5)
    assert (tmp_path / "a" / "checkpoints" / "best" / "model.safetensors").exists()
    assert (tmp_path / "a" / "config.yaml").exists()


def test_missing_views_are_masked_and_empty_exam_is_error():
    model = MultiViewClassifier(dim=32, tokens=(2, 2), heads=2).eval()
    images = torch.rand(2, 4, 1, 64, 32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = model(images, mask)
    assert out["tokens"][0, 3].abs().sum() == 0 and out["birads"].shape == (2, 2, 9)
    changed = images.clone()
    changed[0, 3] = 1.0  # a masked view must not influence the outputs
    torch.testing.assert_close(model(changed, mask)["birads"][0], out["birads"][0])
    with pytest.raises(ValueError, match="no usable view"):
        model(images[:1], torch.zeros(1, 4, dtype=torch.bool))


def test_predict_with_oof_and_features(cache_manifest, tmp_path):
    from safetensors.torch import load_file

    from mammorg.app.cli import main as cli
    from mammorg.io import read_jsonl

    run_dir = tmp_path / "run"
    assert train_stage1(cache_manifest, run_dir, "data.val_split=train", "train.epochs=1") == 0
    assert (run_dir / "learning_curve.png").exists() and (run_dir / "confusion_birads.png").exists()
    points = OperatingPoints.load(run_dir)
    assert (run_dir / "operating_points.json").exists() and points != OperatingPoints()
    out = tmp_path / "pred" / "pred.jsonl"
    assert (
        cli(
            [
                "stage1",
                "predict",
                "--run",
                str(run_dir),
                "--manifest",
                str(cache_manifest),
                "--out",
                str(out),
                "--oof",
                "2",
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    exams = read_jsonl(cache_manifest)
    assert [r["exam_id"] for r in rows] == [e["exam_id"] for e in exams]
    train_ids = {e["exam_id"] for e in exams if e["split"] == "train"}
    for r in rows:
        assert r["source"].startswith("oof-fold") == (r["exam_id"] in train_ids)
        assert abs(sum(r["probs"]["density"].values()) - 1) < 1e-4
        assert r["pred"]["birads"]["exam"] in {r["pred"]["birads"]["L"], r["pred"]["birads"]["R"]}
        feats = load_file(str(out.parent / r["features"]))
        assert feats["tokens"].shape == (4, 4, 64) and feats["tokens"].abs().sum() > 0
    assert (run_dir / "oof" / "k2" / "fold1" / "checkpoints" / "last" / "model.safetensors").exists()
    assert (run_dir / "oof" / "k2" / "fold1" / "operating_points.json").exists()
    assert oof_folds(out) == 2  # the pipeline re-predicts when stage1.oof_folds changes
    thresholds = dict(zip(FINDINGS, points.finding_thresholds))
    model_rows = [r for r in rows if r["source"] == "model"]
    for r in model_rows:  # labels follow the run's operating points, not 0.5
        for side, found in r["pred"]["findings"].items():
            for name, state in found.items():
                assert (state == "pos") == (r["probs"]["findings"][side][name] >= thresholds[name])
    assert (
        cli(
            [
                "stage1",
                "predict",
                "--run",
                str(tmp_path / "nope"),
                "--manifest",
                str(cache_manifest),
                "--out",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "deepspeed-zero2"])
def test_two_ranks_on_cpu(cache_manifest, tmp_path, deepspeed):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    extra = ["deepspeed.config=deepspeed/zero2"] if deepspeed else []

    def launch(*args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29511 + deepspeed),
            "-m",
            "mammorg",
            "stage1",
            "train",
            "--config",
            "stage1/tiny",
            f"data.cache_manifest={cache_manifest}",
            "data.val_split=train",
            f"run_dir={tmp_path / 'run'}",
            "train.epochs=2",
            *extra,
            *args,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = launch("train.stop_after_epochs=1")
    assert first.stdout.count('"run_dir"') == 1  # one result line, from rank 0
    second = launch()  # resumes at epoch 1 from checkpoints/last
    assert "resumed from" in second.stderr and "resumed from" not in second.stdout
    assert len(_losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "model",
    [
        ["model.descriptor_heads=true"],
        ["model.descriptor_heads=true", "model.localise=true", "model.lesion_features=true"],
    ],
)
def test_descriptor_heads_learn_from_synthetic_descriptors(cache_manifest, tmp_path, model):
    from mammorg.app.cli import main as cli
    from mammorg.io import read_jsonl

    exams = read_jsonl(cache_manifest)
    described = [e for e in exams if any((e["labels"].get("descriptors") or {}).values())]
    assert described, "the synthetic VinDr layout carries descriptors through ingest"
    run_dir = tmp_path / "desc"
    assert train_stage1(cache_manifest, run_dir, "data.val_split=train", "train.epochs=1", *model) == 0
    val = [json.loads(x)["val"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert any(k.startswith("desc_") and k.endswith("_acc") for k in val)
    out = tmp_path / "pred.jsonl"
    assert cli(["stage1", "predict", "--run", str(run_dir), "--manifest", str(cache_manifest), "--out", str(out)]) == 0
    row = read_jsonl(out)[0]
    assert set(row["pred"]["descriptors"]["L"]) == {
        "mass_shape",
        "mass_margin",
        "calc_morphology",
        "calc_distribution",
    }


def _crop_reader_run(manifest, run_dir) -> list[str]:
    """Overrides of ``stage1/tiny`` for a small run with lesion crops and the crop reader's phase."""
    return [
        f"data.cache_manifest={manifest}",
        "data.val_split=train",
        "model.localise=true",
        "model.descriptor_heads=true",
        "model.lesion_crops=true",
        "model.crop_size=16",
        "train.crop_epochs=30",
        "train.crop_jitter=0.2",  # main epochs' crops off the box centres
        f"run_dir={run_dir}",
    ]


def test_crop_reader_trains_first_then_stays_frozen(cache_manifest, tmp_path):
    """``train.crop_epochs``: the crop reader learns the descriptors from box crops before the
    main epochs, which leave it as it was; a resumed run does not repeat the phase."""
    from mammorg.io import MammorgError
    from mammorg.training.checkpoint import load_tensors
    from stage1_classification.inference import WEIGHTS, load_run
    from stage1_classification.train import CROP_READER_FILE

    base = _crop_reader_run(cache_manifest, tmp_path / "r")
    run(load_config("stage1/tiny", Stage1Config, [*base, "train.epochs=2", "train.stop_after_epochs=1"]))
    summary = json.loads((tmp_path / "r" / CROP_READER_FILE).read_text())
    assert summary["train_breasts"] > 0 and summary["epochs"] == 30
    assert summary["train_loss"] < 0.7 * summary["train_loss_first_epoch"]
    assert "lesion_birads" in summary["val_accuracy_at_boxes"]
    first = load_tensors(tmp_path / "r" / "checkpoints" / "last" / WEIGHTS)
    (tmp_path / "r" / CROP_READER_FILE).unlink()
    run(load_config("stage1/tiny", Stage1Config, [*base, "train.epochs=2"]))  # resumes at epoch 1
    assert not (tmp_path / "r" / CROP_READER_FILE).exists()
    second = load_tensors(tmp_path / "r" / "checkpoints" / "last" / WEIGHTS)
    frozen = [k for k in first if k.startswith(("crops.", "descriptor_heads."))]
    assert frozen and all(torch.equal(first[k], second[k]) for k in frozen)
    assert not torch.equal(first["birads_head.0.weight"], second["birads_head.0.weight"])
    with pytest.raises(MammorgError, match="it needs model.lesion_crops=true"):
        load_config("stage1/tiny", Stage1Config, ["train.crop_epochs=5"])
    with pytest.raises(MammorgError, match="train.crop_jitter=0.7"):
        load_config("stage1/tiny", Stage1Config, ["train.crop_jitter=0.7"])
    config = tmp_path / "r" / "config.yaml"  # weights of another model: named in one line
    config.write_text(
        config.read_text()
        .replace("lesion_crops: true", "lesion_crops: false")
        .replace("crop_epochs: 30", "crop_epochs: 0")
    )
    with pytest.raises(MammorgError, match="does not match the model"):
        load_run(tmp_path / "r")


def test_selection_score_weighs_finding_auroc():
    """Validation scores of two epochs of the crop-reader benchmark row (2026-12-01): epoch 1's
    lucky BI-RADS F1 with untrained heatmaps must not beat epoch 9."""
    early = {"birads_f1": 0.406, "density_f1": 1.0, "finding_auroc_mean": 0.716}
    late = {"birads_f1": 0.380, "density_f1": 1.0, "finding_auroc_mean": 0.938}
    assert selection_score(late) > selection_score(early)
    assert selection_score({"birads_f1": 0.5}) == pytest.approx(0.5)
    assert math.isnan(selection_score({}))


def test_crop_reader_without_boxes_trains_with_the_main_epochs(cache_manifest, tmp_path):
    """A training split without lesion boxes skips the crop reader's phase (said in its summary)
    and leaves the reader trainable, on the first run and on resume."""
    from mammorg.io import read_jsonl, write_jsonl_atomic
    from mammorg.training.checkpoint import load_tensors
    from stage1_classification.inference import WEIGHTS
    from stage1_classification.train import CROP_READER_FILE, CROPS_SKIPPED

    rows = read_jsonl(cache_manifest)
    assert any(r.get("lesions") for r in rows)
    unboxed = cache_manifest.parent / "unboxed.jsonl"
    write_jsonl_atomic(unboxed, [{k: v for k, v in r.items() if k != "lesions"} for r in rows])
    base = [*_crop_reader_run(unboxed, tmp_path / "r"), "train.epochs=2"]
    run(load_config("stage1/tiny", Stage1Config, [*base, "train.stop_after_epochs=1"]))
    summary = json.loads((tmp_path / "r" / CROP_READER_FILE).read_text())
    assert summary["train_breasts"] == 0 and summary["skipped"] == CROPS_SKIPPED
    first = load_tensors(tmp_path / "r" / "checkpoints" / "last" / WEIGHTS)
    run(load_config("stage1/tiny", Stage1Config, base))  # resumes: still trainable
    second = load_tensors(tmp_path / "r" / "checkpoints" / "last" / WEIGHTS)
    assert not torch.equal(first["crops.encoder.0.weight"], second["crops.encoder.0.weight"])
