"""Shared fixtures: tiny synthetic data made at test time."""
from __future__ import annotations

from pathlib import Path

import pytest

from mammorg.synth.writer import SynthSettings, synthesise


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesise(root, SynthSettings(exams=8, seed=3, height=128, width=64), progress=False)
    return root
