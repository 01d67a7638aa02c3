"""``dlrm-preprocess``: Criteo TSV (plain or .gz) -> Parquet splits with frequency-ranked ids.

dlrm-preprocess dataset=criteo_kaggle input=/data/criteo/train.txt output_dir=/data/criteo_pq
dlrm-preprocess dataset=criteo_1tb input='/data/criteo/day_*.gz' output_dir=... preprocess.min_count=3
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from dlrm_cache.cli.common import run_cli
from dlrm_cache.cli.schemas import register_configs, to_config
from dlrm_cache.config import PreprocessRunConfig
from dlrm_cache.data.preprocess import preprocess

register_configs()


@hydra.main(config_path="pkg://dlrm_cache.configs", config_name="preprocess", version_base=None)
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def job() -> None:
        out = preprocess(to_config(cfg, PreprocessRunConfig))
        print(f"dlrm-preprocess: {out} ({out / 'metadata.json'})")

    run_cli("dlrm-preprocess", job)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
