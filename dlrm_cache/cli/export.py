"""``dlrm-export``: a trained run as ``model.json`` + ``model.pt``, loadable by TorchRec alone.

dlrm-export run_dir=outputs/2026-12-01/10-00-00 output=exported/kaggle_dlrm
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from dlrm_cache.cli.common import run_cli
from dlrm_cache.cli.schemas import register_configs, to_config
from dlrm_cache.config import ExportConfig
from dlrm_cache.train.export import export

register_configs()


@hydra.main(config_path="pkg://dlrm_cache.configs", config_name="export", version_base=None)
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def job() -> None:
        out = export(to_config(cfg, ExportConfig))
        print(f"dlrm-export: {out / 'model.json'}, {out / 'model.pt'}")

    run_cli("dlrm-export", job)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
