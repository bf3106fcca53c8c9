"""The distribution: a wheel built from the repository holds every package and the shipped
configs, and config names resolve from the installed package alone (no source tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "mammorg",
    "mammorg/app",
    "mammorg/data",
    "mammorg/synth",
    "mammorg/training",
    "terminology",
    "evaluation",
    "stage1_classification",
    "stage2_sft",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("mammorg-*.whl")
    return path


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        sources = {str(p.relative_to(ROOT)) for p in (ROOT / package).glob("*.py")}
        assert sources and sources <= names, f"{package}: {sorted(sources - names)[:3]} missing from the wheel"
    configs = {
        str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".json")
    }
    assert {f"mammorg/configs/{c}" for c in configs} <= names
    assert "terminology/lexicon.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mammorg = mammorg.app.cli:main" in entry_points


def test_config_names_resolve_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import json, mammorg; from mammorg.config import resolve_config, load_config, list_configs; "
        "from mammorg.app.config import PipelineConfig; "
        "cfg = load_config('pipeline/demo', PipelineConfig); "
        "print(json.dumps({'package': mammorg.__file__, 'demo': str(resolve_config('pipeline/demo')), "
        "'names': list_configs(), 'stage1': cfg.stage1.config}))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert found["package"].startswith(str(site)) and found["demo"].startswith(str(site))
    assert "stage2/tiny" in found["names"] and found["stage1"] == "stage1/default"
