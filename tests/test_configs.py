"""Every config group composes from the installed package and validates; bad values name their key."""

import subprocess
import sys
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dlrm_cache import config as schemas
from dlrm_cache.cli.schemas import register_configs, to_config
from dlrm_cache.config import ConfigError, PreprocessRunConfig, SynthConfig, TrainRunConfig

register_configs()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _compose(name, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_module("dlrm_cache.configs", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "cache", "optim", "trainer", "experiment"])
def test_every_option_of_every_group_composes_and_validates(group):
    options = _options(group)
    assert options, f"configs/{group} has no options"
    for option in options:
        cfg = to_config(_compose("train", [f"{group}={option}"]), TrainRunConfig)
        assert isinstance(cfg, TrainRunConfig)


@pytest.mark.parametrize("dataset", _options("dataset"))
def test_every_dataset_composes_into_the_preprocess_schema(dataset):
    cfg = _compose("preprocess", [f"dataset={dataset}", "input=a.txt", "output_dir=out"])
    run = to_config(cfg, PreprocessRunConfig)
    assert run.dataset.name == dataset and run.input == ["a.txt"]


def test_preprocess_requires_input_and_output():
    with pytest.raises(ConfigError, match="input"):
        to_config(_compose("preprocess", ["output_dir=out"]), PreprocessRunConfig)


def test_group_choice_reaches_the_schema():
    cfg = to_config(_compose("train", ["model=dcn", "optim=adam", "cache.ratio=0.02"]), TrainRunConfig)
    assert (cfg.model.name, cfg.optim.sparse, cfg.optim.dense, cfg.cache.ratio) == (
        "dcn",
        "adam",
        "adam",
        0.02,
    )
    cfg = to_config(_compose("train", ["experiment=kaggle_dcn"]), TrainRunConfig)
    assert (cfg.model.name, cfg.trainer.device, cfg.train.batch_size) == ("dcn", "cuda", 4096)


def test_mlperf_queues_as_many_samples_ahead_at_either_batch_size():
    """8 batches of 65,536 (what the host can hold of MLPerf's bags) and 256 of 2,048 alike."""
    big, small = (to_config(_compose("train", [f"experiment={e}"]), TrainRunConfig)
                  for e in ("mlperf_dcnv2", "mlperf_dcnv2_small"))  # fmt: skip
    assert (big.cache.lookahead, small.cache.lookahead) == (8, 256)
    assert big.cache.lookahead * big.train.batch_size == small.cache.lookahead * small.train.batch_size


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cache.ratio=0", "cache.ratio"),
        ("cache.ratio=1.5", "cache.ratio"),
        ("cache.lookahead=-1", "cache.lookahead"),
        ("cache.policy=fifo", "cache.policy"),
        ("optim.sparse=rmsprop", "optim.sparse"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.embedding_dim=32", "model.dense_arch_layer_sizes"),
        ("trainer.collective_timeout_min=0", "trainer.collective_timeout_min"),
        ("+train.max_step=3", "train.max_step: no such key"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(_compose("train", [override]), TrainRunConfig)


def test_wrong_type_names_the_key():
    with pytest.raises(Exception, match="rows"):
        _compose("synth", ["rows=abc"])
    with pytest.raises(ConfigError, match="zipf"):
        to_config({"zipf": "steep"}, SynthConfig)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="colour"):
        _compose("train", ["cache.colour=blue"])


def test_installed_package_finds_its_configs_from_any_directory(tmp_path):
    out = tmp_path / "t.txt"
    r = subprocess.run(
        [sys.executable, "-m", "dlrm_cache.cli.synth", "rows=10", f"out={out}", "progress=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 10


@pytest.mark.parametrize(
    "error,line",
    [
        (PermissionError(13, "Permission denied", "/data/out"), "/data/out: Permission denied"),
        (OSError(28, "checkpoint not written (No space left on device)"),
         "checkpoint not written (No space left on device)"),
        (FileNotFoundError("data.path=/nope: no such folder"), "data.path=/nope: no such folder"),
    ],
)  # fmt: skip
def test_what_the_os_says_is_one_line_naming_the_file_and_exit_2(error, line, capsys):
    from dlrm_cache.cli.common import EXIT_BAD_INPUT, run_cli

    def job():
        raise error

    with pytest.raises(SystemExit) as stopped:
        run_cli("dlrm-x", job)
    assert stopped.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"dlrm-x: error: {line}\n"


SCHEMA_OF = {
    "synth.yaml": schemas.SynthConfig, "preprocess.yaml": schemas.PreprocessRunConfig,
    "train.yaml": schemas.TrainRunConfig, "predict.yaml": schemas.PredictConfig,
    "export.yaml": schemas.ExportConfig, "data": schemas.DataConfig, "dataset": schemas.DatasetConfig,
    "model": schemas.ModelConfig, "cache": schemas.CacheConfig, "optim": schemas.OptimConfig,
    "trainer": schemas.TrainerConfig, "experiment": schemas.TrainRunConfig,
}  # fmt: skip


def _repeated(given: dict, defaults: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out += _repeated(value, defaults[key], f"{prefix}{key}.")
        elif key in defaults and value == defaults[key]:
            out.append(f"{prefix}{key}={value!r}")
    return out


def _given(path) -> tuple[dict, dict]:
    """What the files of its own group a config file builds on (its defaults list: ``- mlperf_dcnv2``)
    set, and what it sets."""
    loaded = OmegaConf.to_container(OmegaConf.load(CONFIGS / path))
    below: dict = {}
    for entry in loaded.get("defaults", []):
        if isinstance(entry, str) and (CONFIGS / path.parent / f"{entry}.yaml").is_file():
            below = OmegaConf.to_container(OmegaConf.merge(below, *_given(path.parent / f"{entry}.yaml")))
    return below, {k: v for k, v in loaded.items() if k not in ("defaults", "hydra")}


@pytest.mark.parametrize("path", sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml")), ids=str)
def test_no_config_file_repeats_a_schema_default(path):
    """Defaults live in one place, dlrm_cache/config.py: a YAML file holds only what it changes (of the
    schema's defaults, or of the file of its group it builds on)."""
    schema = SCHEMA_OF[path.parts[0]]
    below, given = _given(path)
    assert _repeated(given, OmegaConf.to_container(OmegaConf.merge(_defaults(schema), below))) == []


def _defaults(schema) -> dict:
    """A schema's field defaults (without constructing it: some fields are required)."""
    out = {}
    for f in fields(schema):
        value = f.default if f.default is not MISSING else f.default_factory()
        out[f.name] = asdict(value) if is_dataclass(value) else value
    return out
