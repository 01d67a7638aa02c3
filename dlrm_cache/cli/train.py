"""``dlrm-train``: train DLRM / DCN on a ``dlrm-preprocess`` output, with the embedding cache.

    dlrm-train                                   # built-in default: synthetic data, CPU, one epoch
    dlrm-train data.path=/data/criteo_pq model=dcn cache.ratio=0.015 optim.sparse=adagrad \
        train.batch_size=4096
    dlrm-train hydra.run.dir=runs/a train.checkpoint_every=1000 train.resume=true

Outputs (metrics.jsonl, summary.json, checkpoint/) go to Hydra's run dir. Under torchrun:
    torchrun --standalone --nproc_per_node=2 -m dlrm_cache.cli.train data.path=/data/criteo_pq
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from dlrm_cache.cli.common import command
from dlrm_cache.config import TrainRunConfig
from dlrm_cache.data.arrow_memory import keep_decoded_memory
from dlrm_cache.distributed.rank import current_rank
from dlrm_cache.files import held


def _train(config: TrainRunConfig) -> None:
    keep_decoded_memory()
    # pyarrow loads with these, after the setting
    from dlrm_cache.train.run_log import json_text
    from dlrm_cache.train.trainer import train

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(config, hydra_dir)
    except BaseException:
        _remove_if_unused(hydra_dir)  # a refused run leaves no run dir behind
        raise
    if Path(summary["run_dir"]) != hydra_dir:  # under torchrun, every rank works in rank 0's
        _remove_if_unused(hydra_dir)
    if current_rank().rank == 0:  # under torchrun, one summary
        shown = {k: v for k, v in summary.items() if k != "cache"}
        shown["cache_hit_rate_unique"] = summary["cache"]["hit_rate_unique"]
        print(json_text(shown, indent=2))
        print(f"dlrm-train: outputs in {summary['run_dir']}")


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run dir that holds nothing but what Hydra (its config, its log) and a run's lock put
    there, unless another run holds it; then its parents under the working folder left empty (Hydra's
    ``outputs/<date>``)."""
    try:
        with held(run_dir, "hydra.run.dir"):
            if set(os.listdir(run_dir)) <= {".hydra", ".lock", "train.log"}:
                shutil.rmtree(run_dir, ignore_errors=True)
    except FileExistsError:  # another run's
        return
    cwd = Path.cwd()
    for parent in run_dir.absolute().parents:
        if parent == cwd or not parent.is_relative_to(cwd):
            break
        with contextlib.suppress(OSError):  # not empty
            parent.rmdir()


main = command("dlrm-train", "train", TrainRunConfig, _train)

if __name__ == "__main__":
    sys.exit(main())
