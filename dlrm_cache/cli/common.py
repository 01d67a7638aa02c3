"""What every command shares: its Hydra entry point, and turning expected failures into one clear line
and a non-zero exit. Imports nothing heavy: ``dlrm-preprocess`` and ``dlrm-synth`` never load torch."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from dlrm_cache.cli.schemas import register_configs, to_config
from dlrm_cache.config import ConfigError
from dlrm_cache.distributed.rank import current_rank
from dlrm_cache.native_build import NativeUnavailable
from dlrm_cache.train.errors import TrainingError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def command(name: str, config_name: str, schema: type, work: Callable[[Any], None], log_info: bool = True):
    """The entry point of command ``name``: Hydra composes ``configs/<config_name>.yaml`` with the
    command line into ``schema``, then ``work(config)`` runs under ``run_cli`` (with INFO logging unless
    ``log_info`` is False). The command line is checked first (``_check``): a bad override, a value of
    the wrong type or out of range, or a run dir that cannot be made is one line and exit 2, and
    nothing is made. Hydra names the job, and its log file, ``config_name``, as the command's module."""
    register_configs()

    def task(cfg: DictConfig) -> None:
        if log_info:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        run_cli(name, lambda: work(to_config(cfg, schema)))

    task.__module__ = f"dlrm_cache.cli.{config_name}"  # what Hydra names the job after
    hydra_main = hydra.main(
        config_path="pkg://dlrm_cache.configs", config_name=config_name, version_base=None
    )(task)

    def main() -> None:
        args = sys.argv[1:]
        if not any(a.startswith("-") for a in args):  # Hydra's own flags (--help, --cfg, -m) are its own
            _check(name, config_name, schema, args)
        hydra_main()

    return main


def _check(name: str, config_name: str, schema: type, overrides: list[str]) -> None:
    """Compose and validate the config as the command will, and see that its run dir can be made."""
    try:
        with initialize_config_module("dlrm_cache.configs", version_base=None):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                run_dir = Path(str(cfg.hydra.run.dir))
                del cfg["hydra"]
            to_config(cfg, schema)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
        _fail(name, _one_line(str(e)) + cause)
    except ConfigError as e:
        _fail(name, str(e))
    finally:
        GlobalHydra.instance().clear()
    if run_dir.exists():  # nothing for Hydra to make (`.` for the commands without a run dir)
        return
    existing = next(p for p in run_dir.absolute().parents if p.exists())
    try:  # made and removed: what Hydra will make there must be possible (root included)
        os.rmdir(tempfile.mkdtemp(prefix=".dlrm-check-", dir=existing))
    except OSError as e:
        _fail(name, f"hydra.run.dir={run_dir}: cannot write into {existing} ({e.strerror or e})")


def _one_line(message: str) -> str:
    """Hydra's multi-line error (the problem, then the options, then the search path) as one line."""
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines()]
    text = "; ".join(line for line in lines if line)
    return text.replace("Available options in", "options in").replace(":;", ":")


def run_cli(name: str, job: Callable[[], None]) -> None:
    """Run ``job``; a bad config or bad input ends the process with ``name: error: ...`` and exit 2
    (under ``torchrun``, naming the rank: torchrun then stops the other ranks)."""
    # TorchRec 1.8 asks torch.fx's is_fx_tracing(), which torch 2.13 answers with a one-time warning
    # addressed to TorchRec's developers: nothing a user can act on.
    logging.getLogger("torch.fx._symbolic_trace").addFilter(
        lambda record: not record.getMessage().startswith("is_fx_tracing will return true")
    )
    rank = current_rank()
    if rank.world_size > 1:
        name = f"{name} [rank {rank.rank}]"
    if rank.rank > 0:  # the libraries' warnings, once (rank 0's); errors are still every rank's own
        warnings.filterwarnings("ignore")
        logging.getLogger().setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _interrupted)  # cleans up as Ctrl-C does
    try:
        job()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (ConfigError, ValueError, TrainingError, NativeUnavailable) as e:
        _fail(name, str(e))
    except OSError as e:  # what the OS said (no room, no permission, ...) about the file it names
        where = f"{e.filename}: " if e.filename else ""
        _fail(name, f"{where}{e.strerror or e}")


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _fail(name: str, message: str) -> None:
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
