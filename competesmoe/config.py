"""The run configuration: one dataclass per component, merged from YAML and `key=value` overrides.

omegaconf merges the layers in order (dataclass defaults, the YAML file, the command line) and
rejects keys that do not exist and values of the wrong type; every error names the dotted key.
Semantic checks (K <= E, omega in [0, 1], ...) live next to each component's dataclass as a
`validate(path)` method and run once the whole tree is built.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from competesmoe.data.config import DataConfig
from competesmoe.errors import ConfigError
from competesmoe.model.config import ModelConfig
from competesmoe.parallel.config import ParallelConfig
from competesmoe.train.config import RunConfig, TrainConfig


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, path: str = "") -> None:
        if self.model.vocab_size is None:
            self.model.vocab_size = self.data.vocab_size
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f"{path}{f.name}")


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{source}: bad config key '{key}': {first_line}")


def _yaml_layers(path: Path, seen: tuple = ()) -> list:
    """The YAML file and, first, the chain of files it names in `_base_` (relative to itself)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        layer = OmegaConf.load(path)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    if layer is not None and not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, not a "
                          f"{type(layer).__name__}")
    base = layer.pop("_base_", None) if isinstance(layer, DictConfig) else None
    below = _yaml_layers(path.parent / base, seen + (path.resolve(),)) if base else []
    return below + [(path, layer)]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated Config from an optional YAML file and dotlist overrides. A YAML file may
    start from another one with `_base_: other.yaml` and change only what differs."""
    merged = OmegaConf.structured(Config)
    for source, layer in (_yaml_layers(Path(path)) if path is not None else []):
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, str(source)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, "command line") from None
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (for example from a checkpoint); unknown keys fail."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, "saved config") from None
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg
