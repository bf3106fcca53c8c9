"""OmegaConf configuration: YAML files, ``_base_`` inheritance, strict ``key=value`` overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mammorg.io import MammorgError, write_text_atomic

BASE_KEY = "_base_"


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if not path.is_file():
        raise MammorgError(f"{path}: config file not found")
    if path in seen:
        raise MammorgError(f"{path}: circular {BASE_KEY} chain")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise MammorgError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise MammorgError(f"{path}: top level must be a mapping")
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    base_cfg = _load_yaml(path.parent / str(base), seen + (path,))
    OmegaConf.set_struct(base_cfg, True)
    try:
        return OmegaConf.merge(base_cfg, cfg)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise MammorgError(f"{path}: unknown key '{exc.full_key}' (not in {base})") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``a.b=value`` overrides; an unknown key is an error naming the key."""
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        if "=" not in item:
            raise MammorgError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        node = OmegaConf.select(cfg, key, default="__missing__")
        if isinstance(node, str) and node == "__missing__":
            raise MammorgError(f"unknown config key '{key}'")
        if isinstance(node, DictConfig) and len(node) == 0:
            OmegaConf.set_struct(node, False)  # an empty mapping (e.g. backbone_kwargs) is open
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise MammorgError(f"bad override: {str(exc).splitlines()[0]}") from None
    OmegaConf.set_struct(merged, True)
    return merged


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML config (following ``_base_``), apply overrides, resolve interpolations."""
    cfg = apply_overrides(_load_yaml(Path(path)), overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise MammorgError(f"{path}: cannot resolve config ({str(exc).splitlines()[0]})") from None
    return cfg


def save_config(cfg: DictConfig, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run folder (atomically)."""
    out = Path(run_dir) / name
    write_text_atomic(out, OmegaConf.to_yaml(cfg, resolve=True))
    return out
