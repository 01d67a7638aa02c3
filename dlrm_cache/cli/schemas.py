"""The schemas in Hydra's ConfigStore, and composed configs turned into them: what only the commands
need (the library takes ``dlrm_cache.config``'s dataclasses and imports neither Hydra nor OmegaConf)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlrm_cache.config import (
    CacheConfig,
    ConfigError,
    DataConfig,
    DatasetConfig,
    ExportConfig,
    ModelConfig,
    OptimConfig,
    PredictConfig,
    PreprocessRunConfig,
    SynthConfig,
    TrainerConfig,
    TrainRunConfig,
)

T = TypeVar("T")


def register_configs() -> None:
    """Register the schemas so that the YAML files in ``configs/`` are validated against them, and
    ``${dlrm_run_id:}``: what tells apart runs started in the same second (the process id; under
    torchrun, the launch's id, the same on every rank)."""
    OmegaConf.register_new_resolver(
        "dlrm_run_id", lambda: os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid()), replace=True
    )
    cs = ConfigStore.instance()
    cs.store(name="synth_schema", node=SynthConfig)
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="preprocess_schema", node=PreprocessRunConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(group="schema", name="dataset", node=DatasetConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="cache", node=CacheConfig)
    cs.store(group="schema", name="optim", node=OptimConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)


def to_config(cfg: DictConfig | dict, schema: type[T]) -> T:
    """Turn a composed config into ``schema``, raising ``ConfigError`` with the key on any problem."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        made = OmegaConf.to_object(merged)  # runs __post_init__
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    # Hydra's `+key=value` adds keys to a typed config too; no schema has them
    given = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
    extra = _extra_keys(given, asdict(made))
    if extra:
        raise ConfigError(f"{extra[0]}: no such key in {schema.__name__} (a typo?)")
    return made


def _extra_keys(given: dict, known: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``given`` that ``known`` lacks."""
    out = []
    for key, value in given.items():
        if key not in known:
            out.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(known[key], dict):
            out += _extra_keys(value, known[key], f"{prefix}{key}.")
    return out
