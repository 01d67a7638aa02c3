"""``dlrm-export``: a trained run as ``model.json`` + ``model.pt``, loadable by TorchRec alone.

dlrm-export run_dir=outputs/2026-12-01/10-00-00-4242 output=exported/kaggle_dlrm
"""

from __future__ import annotations

import sys

from dlrm_cache.cli.common import command
from dlrm_cache.config import ExportConfig
from dlrm_cache.train.export import export


def _export(config: ExportConfig) -> None:
    out = export(config)
    print(f"dlrm-export: {out / 'model.json'}, {out / 'model.pt'}")


main = command("dlrm-export", "export", ExportConfig, _export)

if __name__ == "__main__":
    sys.exit(main())
