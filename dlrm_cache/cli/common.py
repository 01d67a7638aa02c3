"""What every command shares: its Hydra entry point, and turning expected failures into one clear line
and a non-zero exit. Imports nothing heavy: ``dlrm-preprocess`` and ``dlrm-synth`` never load torch."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from dlrm_cache.cli.schemas import register_configs
from dlrm_cache.config import ConfigError
from dlrm_cache.distributed.rank import current_rank
from dlrm_cache.native_build import NativeUnavailable
from dlrm_cache.train.errors import TrainingError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def command(name: str, config_name: str, work: Callable[[DictConfig], None], log_info: bool = True):
    """The entry point of command ``name``: Hydra composes ``configs/<config_name>.yaml`` with the
    command line, then ``work(cfg)`` runs under ``run_cli`` (with INFO logging unless ``log_info`` is
    False). Hydra names the job, and its log file, ``config_name``, as the command's own module."""
    register_configs()

    def task(cfg: DictConfig) -> None:
        if log_info:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        run_cli(name, lambda: work(cfg))

    task.__module__ = f"dlrm_cache.cli.{config_name}"  # what Hydra names the job after
    return hydra.main(config_path="pkg://dlrm_cache.configs", config_name=config_name, version_base=None)(
        task
    )


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
