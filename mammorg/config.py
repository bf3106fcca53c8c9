"""Configuration: named configs shipped with the package, YAML files, ``_base_`` inheritance,
structured schemas (dataclasses through OmegaConf), strict ``key=value`` overrides, migration.

A config is addressed by name (``stage2/tiny``, as ``mammorg config list`` shows) or by a file
path. Loading with a schema merges the YAML into the schema's defaults, so an unknown key, a
wrong type or (through the dataclasses' ``__post_init__``) a bad value is a one-line error, and
returns the typed dataclass. Runs saved by older versions go through ``migrate()`` first.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mammorg.io import MammorgError, write_text_atomic

BASE_KEY = "_base_"
CONFIG_PACKAGE = "mammorg.configs"
T = TypeVar("T")


def config_root() -> Path:
    """The folder of the shipped configs (``configs/`` of the source tree, installed as
    ``mammorg/configs``)."""
    try:
        return Path(str(importlib.resources.files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:
        source_tree = Path(__file__).resolve().parents[1] / "configs"  # run from a checkout, not installed
        if source_tree.is_dir():
            return source_tree
        raise MammorgError("the shipped configs are missing (mammorg.configs is not installed)") from None


def list_configs() -> list[str]:
    """Names of the shipped configs (``stage2/tiny``, ``deepspeed/zero3.json``, ...)."""
    root = config_root()
    names = []
    for path in sorted(root.rglob("*")):
        if path.suffix == ".yaml":
            names.append(str(path.relative_to(root).with_suffix("")))
        elif path.suffix == ".json":
            names.append(str(path.relative_to(root)))
    return names


def resolve_config(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A config file from a path (tried relative to ``relative_to`` first, as a config naming
    another does), or from a shipped name (``stage2/tiny`` or ``stage2/tiny.yaml``)."""
    path = Path(ref)
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_file():
        return relative_to / path
    if path.is_file():
        return path
    root = config_root()
    for candidate in (root / str(ref), root / f"{ref}.yaml", root / f"{ref}.json"):
        if candidate.is_file():
            return candidate
    raise MammorgError(f"{ref}: config file not found (nor a shipped config name: see 'mammorg config list')")


def copy_config(name: str, dest: str | Path) -> Path:
    """``mammorg config cp NAME DEST``: a shipped config copied out for editing."""
    src = resolve_config(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise MammorgError(f"{dest}: already exists; not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
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
    base_cfg = _load_yaml(resolve_config(str(base), relative_to=path.parent), (*seen, path))
    merged = OmegaConf.merge(base_cfg, cfg)  # keys are checked against the schema later
    assert isinstance(merged, DictConfig)
    return merged


def migrate(raw: DictConfig, schema: type) -> DictConfig:
    """Bring a config saved by an older version up to ``schema``: keys in ``schema.RENAMED``
    (old dotted key -> new) move, keys in ``schema.REMOVED`` are dropped. Keys that were added
    since come from the schema's defaults when the config is merged into it."""
    OmegaConf.set_struct(raw, False)
    for old, new in getattr(schema, "RENAMED", {}).items():
        value = OmegaConf.select(raw, old, default=None)
        if value is not None and OmegaConf.select(raw, new, default=None) is None:
            OmegaConf.update(raw, new, value, force_add=True)
        _drop(raw, old)
    for key in getattr(schema, "REMOVED", ()):
        _drop(raw, key)
    return raw


def _drop(cfg: DictConfig, dotted: str) -> None:
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        parent.pop(leaf)


def _structured(raw: DictConfig, schema: type, source: str) -> DictConfig:
    """``raw`` (after ``migrate``) merged into the schema's defaults: unknown keys and wrong types
    are errors naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), migrate(raw, schema))
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise MammorgError(f"{source}: unknown key '{exc.full_key}' (not in the {schema.__name__} schema)") from None
    except OmegaConfBaseException as exc:
        raise MammorgError(f"{source}: invalid config ({str(exc).splitlines()[0]})") from None
    assert isinstance(merged, DictConfig)
    return merged


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``a.b=value`` overrides to a structured config; an unknown key is an error naming it."""
    for item in overrides:
        if "=" not in item:
            raise MammorgError(f"override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise MammorgError(f"unknown config key '{exc.full_key}'") from None
    except OmegaConfBaseException as exc:
        raise MammorgError(f"bad override: {str(exc).splitlines()[0]}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _to_object(cfg: DictConfig, source: str) -> Any:
    """The schema's dataclass; its ``__post_init__`` checks turn into one-line errors."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise MammorgError(f"{source}: invalid config ({str(exc).splitlines()[0]})") from None
    except (ValueError, TypeError) as exc:
        raise MammorgError(f"{source}: {exc}") from None


def load_config(ref: str | Path, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Load a config by name or path (following ``_base_``) into ``schema``, apply overrides,
    resolve interpolations and return the validated dataclass."""
    path = resolve_config(ref)
    cfg = apply_overrides(_structured(_load_yaml(path), schema, str(path)), overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise MammorgError(f"{path}: cannot resolve config ({str(exc).splitlines()[0]})") from None
    result: T = _to_object(cfg, str(path))
    return result


def to_yaml(cfg: Any) -> str:
    """YAML text of a typed config (dataclass) or a DictConfig."""
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return OmegaConf.to_yaml(node, resolve=True)


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run folder (atomically)."""
    out = Path(run_dir) / name
    write_text_atomic(out, to_yaml(cfg))
    return out


def replace(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of a typed config with ``key=value`` overrides applied (checked like the CLI's)."""
    node = apply_overrides(OmegaConf.structured(cfg), overrides)
    result: T = _to_object(node, f"{type(cfg).__name__} overrides")
    return result
