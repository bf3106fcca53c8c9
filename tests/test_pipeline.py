"""End to end: the tiny pipeline, export + reload + report on a new exam, tampering, ablations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mammorg.app.bundle import load_bundle
from mammorg.app.cli import main as cli
from mammorg.app.reporting import ExamReporter
from mammorg.config import resolve_config
from mammorg.io import read_jsonl
from mammorg.synth.writer import SynthSettings, synthesise


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    assert cli(["demo", "--config", "pipeline/tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def new_exam(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_exam")
    synthesise(root, SynthSettings(exams=1, seed=99, height=128, width=64), progress=False)
    return sorted((root / "images").iterdir())[0]


def test_pipeline_outputs(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"birads_f1", "density_f1", "finding_f1", "bleu_4", "rouge_l"}
    assert summary["generated_test_reports"] == len(read_jsonl(demo / "references.jsonl")) > 0
    assert "mammorg: generated mammography reports" in (demo / "index.html").read_text()
    assert "data:image/png;base64," in (demo / "index.html").read_text() and (demo / "stage1" / "learning_curve.png").exists()
    example = json.loads((demo / "report_example.json").read_text())
    assert "text" in example and example["missing_views"] == []


def test_bundle_reloads_and_reports_a_new_exam(demo, new_exam, capsys):
    bundle = load_bundle(demo / "bundle")
    meta = bundle.metadata
    assert meta["sha256"] and "transformers" in meta["versions"]
    assert "architectural distortion" in bundle.reporter.tokenizer.get_vocab()
    assert not list((demo / "bundle").rglob("*.bin")) and not list((demo / "bundle").rglob("*.pt"))
    capsys.readouterr()
    assert cli(["report", "--bundle", str(demo / "bundle"), str(new_exam), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"text", "structured", "stage1", "missing_views", "seconds"}
    assert abs(sum(result["stage1"]["probs"]["density"].values()) - 1) < 1e-4
    assert result["seconds"] < 2.0  # CPU latency after loading (tiny bundle)


def test_bundle_report_can_state_stage1_assessment(demo, new_exam):
    reporter = ExamReporter.load(demo / "bundle")
    reporter.bundle.reporter.settings.assessment = "stage1"
    views = reporter.load_views(sorted(p for p in new_exam.rglob("*") if p.is_file()))
    result = reporter.report_views(views).to_json()
    pred = result["stage1"]["pred"]["birads"]
    stated = {v for v in result["structured"]["birads"].values() if v is not None}
    assert stated <= {pred["L"], pred["R"]}


def test_missing_view_is_flagged(demo, new_exam, capsys):
    files = sorted(str(p) for p in new_exam.iterdir())[:3]
    capsys.readouterr()
    assert cli(["report", "--bundle", str(demo / "bundle"), *files, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result["missing_views"]) == 1 and result["flags"]
    assert "WARNING" in captured.err


def test_tampered_bundle_and_pickles_are_refused(demo, tmp_path, new_exam, capsys):
    bad = tmp_path / "bundle"
    shutil.copytree(demo / "bundle", bad)
    data = bytearray((bad / "extras.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "extras.safetensors").write_bytes(bytes(data))
    assert cli(["report", "--bundle", str(bad), str(new_exam)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    shutil.copy2(demo / "bundle" / "extras.safetensors", bad / "extras.safetensors")
    (bad / "stage1" / "extra.pt").write_bytes(b"\x80\x04N.")
    assert cli(["report", "--bundle", str(bad), str(new_exam)]) == 2
    assert "pickle file in bundle refused" in capsys.readouterr().err


def test_ablation_grid_two_rows(tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", "--config", "ablations/tiny", f"out={out}"]
    assert cli(args) == 0
    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 3 and table[1].startswith("none") and "birads_f1_p" in table[0]
    assert (out / "ablation.png").exists() and "| discrete |" in (out / "table.md").read_text()
    assert "| baseline |" in (out / "table.md").read_text()
    capsys.readouterr()
    assert cli(args) == 0  # finished runs are not redone
    assert capsys.readouterr().out.count("done before, skipped") == 2
    versus = _ablation_with_versus(tmp_path, "discrete")
    assert cli(["ablate", "--config", str(versus), f"out={out}"]) == 0
    md = (out / "table.md").read_text()
    assert "vs discrete |" in md and "vs none |" in md and "| baseline |" not in md
    assert cli(["ablate", "--config", str(_ablation_with_versus(tmp_path, "elsewhere")), f"out={out}"]) == 2
    assert "baseline 'elsewhere' is not a row of the grid" in capsys.readouterr().err


def _ablation_with_versus(tmp_path: Path, versus: str) -> Path:
    """The tiny ablation, its ``none`` row compared with row ``versus`` instead of the baseline."""
    cfg = OmegaConf.load(resolve_config("ablations/tiny"))
    cfg.pipeline = str(resolve_config("pipeline/tiny"))
    cfg.grid.none.versus = versus
    path = tmp_path / f"versus-{versus}.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_batch_report_over_a_manifest_keeps_going_past_a_bad_exam(demo, tmp_path, capsys):
    rows = read_jsonl(demo / "manifest.jsonl")[:3]
    for row in rows:  # absolute paths, since the manifest moves
        row["views"] = {v: (str(demo / p) if p else None) for v, p in row["views"].items()}
    rows[1]["views"]["L_CC"] = str(tmp_path / "missing.dcm")
    manifest = tmp_path / "exams.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "reports.jsonl"
    assert cli(["report", "--bundle", str(demo / "bundle"), "--batch", str(manifest), "--out", str(out)]) == 0
    results = read_jsonl(out)
    assert [r["id"] for r in results] == [r["exam_id"] for r in rows]
    assert "error" in results[1] and "missing.dcm" in results[1]["error"]
    assert "text" in results[0] and "text" in results[2]
