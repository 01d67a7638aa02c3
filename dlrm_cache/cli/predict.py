"""``dlrm-predict``: a trained run's click probabilities for new data, one per input line, in order.

dlrm-predict run_dir=outputs/2026-12-01/10-00-00 input=/data/criteo/test.txt output=submission.csv
dlrm-predict run_dir=runs/a input=/data/day31_pq split=test output=day31.csv   # a preprocessed folder
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from dlrm_cache.cli.common import run_cli
from dlrm_cache.cli.schemas import register_configs, to_config
from dlrm_cache.config import PredictConfig
from dlrm_cache.train.predict import predict

register_configs()


@hydra.main(config_path="pkg://dlrm_cache.configs", config_name="predict", version_base=None)
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def job() -> None:
        out = predict(to_config(cfg, PredictConfig))
        print(f"dlrm-predict: {out}")

    run_cli("dlrm-predict", job)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
