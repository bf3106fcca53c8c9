import pytest

from mammorg.config import load_config, save_config
from mammorg.io import MammorgError


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_overrides_and_base(tmp_path):
    _write(tmp_path, "base.yaml", "# run: nothing\ntrain:\n  lr: 0.1\n  epochs: 2\nname: base\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(child, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.name == "base"
    out = save_config(cfg, tmp_path / "run")
    assert "lr: 0.5" in out.read_text()


def test_unknown_override_key_is_named(tmp_path):
    p = _write(tmp_path, "c.yaml", "train:\n  lr: 0.1\n")
    with pytest.raises(MammorgError, match="unknown config key 'train.lrr'"):
        load_config(p, ["train.lrr=1"])


def test_unknown_key_in_child_is_error(tmp_path):
    _write(tmp_path, "base.yaml", "a: 1\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\nb: 2\n")
    with pytest.raises(MammorgError, match="unknown key 'b'"):
        load_config(child)


def test_missing_file(tmp_path):
    with pytest.raises(MammorgError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
