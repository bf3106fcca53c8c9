"""Configs: schemas, _base_ chains, overrides, names, migration, the shipped configs."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from mammorg.app.ablate import row_plans
from mammorg.app.config import AblationConfig, PipelineConfig
from mammorg.app.pipeline import Pipeline
from mammorg.config import copy_config, list_configs, load_config, migrate, resolve_config, save_config
from mammorg.io import MammorgError
from stage1_classification.config import Stage1Config
from stage2_sft.config import PretrainConfig, Stage2Config


@dataclass
class Train:
    lr: float = 0.1
    epochs: int = 2


@dataclass
class Schema:
    name: str = "schema"
    train: Train = field(default_factory=Train)
    RENAMED: ClassVar[dict[str, str]] = {"train.steps": "train.epochs"}
    REMOVED: ClassVar[tuple[str, ...]] = ("train.legacy",)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_overrides_and_base(tmp_path):
    _write(tmp_path, "base.yaml", "# run: nothing\ntrain:\n  lr: 0.1\n  epochs: 2\nname: base\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(child, Schema, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.name == "base"
    out = save_config(cfg, tmp_path / "run")
    assert "lr: 0.5" in out.read_text()


def test_unknown_override_key_is_named(tmp_path):
    p = _write(tmp_path, "c.yaml", "train:\n  lr: 0.1\n")
    with pytest.raises(MammorgError, match="unknown config key 'train.lrr'"):
        load_config(p, Schema, ["train.lrr=1"])


def test_unknown_key_in_child_is_error(tmp_path):
    _write(tmp_path, "base.yaml", "name: a\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\nb: 2\n")
    with pytest.raises(MammorgError, match="unknown key 'b'"):
        load_config(child, Schema)


def test_missing_file(tmp_path):
    with pytest.raises(MammorgError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", Schema)


def test_wrong_types_and_values_are_one_line_errors(tmp_path):
    with pytest.raises(MammorgError, match="invalid config"):
        load_config(_write(tmp_path, "c.yaml", "train:\n  epochs: many\n"), Schema)
    with pytest.raises(MammorgError, match=r"assessment=stage1 states stage 1's decisions, which knowledge.mode=none"):
        load_config("stage2/tiny", Stage2Config, ["knowledge.mode=none"])
    with pytest.raises(MammorgError, match=r"knowledge.mode='verbose': expected one of none, discrete"):
        load_config("stage2/tiny", Stage2Config, ["knowledge.mode=verbose"])
    with pytest.raises(MammorgError, match="model.dim=100 is not divisible by model.heads=3"):
        load_config("stage1/tiny", Stage1Config, ["model.dim=100", "model.heads=3"])
    with pytest.raises(MammorgError, match="model.lesion_features=true reads the finding heatmaps"):
        load_config("stage1/tiny", Stage1Config, ["model.lesion_features=true"])


def test_migrate_renames_and_drops_keys_of_older_runs(tmp_path):
    old = _write(tmp_path, "old.yaml", "train:\n  steps: 7\n  legacy: true\n")
    cfg = load_config(old, Schema)
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.1  # added keys take the schema's defaults
    from omegaconf import OmegaConf

    raw = migrate(OmegaConf.create({"train": {"legacy": 1}}), Schema)
    assert "legacy" not in raw.train


def _check_ablation_rows(cfg: AblationConfig, where: Path, out: Path) -> None:
    """Every row's stage-1 and stage-2 configs, with the pipeline's and the row's overrides, load strictly."""
    pipe_path = resolve_config(cfg.pipeline, relative_to=where).resolve()
    row_plans(cfg, Pipeline(load_config(pipe_path, PipelineConfig), pipe_path.parent, out), where)


def test_every_shipped_config_loads_and_names_resolve(tmp_path):
    names = list_configs()
    schemas = {
        "stage1": Stage1Config,
        "stage2": Stage2Config,
        "pipeline": PipelineConfig,
        "ablations": AblationConfig,
    }
    assert {"stage1/default", "stage2/tiny", "pipeline/demo", "deepspeed/zero3.json"} <= set(names)
    for name in names:
        family = name.split("/")[0]
        if family == "deepspeed":
            continue
        schema = PretrainConfig if name == "stage2/pretrain" else schemas[family]
        cfg = load_config(name, schema)
        if family == "ablations":
            _check_ablation_rows(cfg, resolve_config(name).parent, tmp_path / "ablation")
        text = resolve_config(name).read_text()
        assert text.startswith("# Launch: mammorg "), name  # every config says how it runs
    assert resolve_config("deepspeed/zero2").name == "zero2.json"
    copied = copy_config("stage2/tiny", tmp_path)
    assert copied.read_text() == resolve_config("stage2/tiny").read_text()
    with pytest.raises(MammorgError, match="already exists"):
        copy_config("stage2/tiny", tmp_path)
