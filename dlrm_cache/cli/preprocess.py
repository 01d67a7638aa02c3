"""``dlrm-preprocess``: Criteo TSV (plain or .gz) -> Parquet splits with frequency-ranked ids.

dlrm-preprocess dataset=criteo_kaggle input=/data/criteo/train.txt output_dir=/data/criteo_pq
dlrm-preprocess dataset=criteo_1tb input='/data/criteo/day_*.gz' output_dir=... preprocess.min_count=3
"""

from __future__ import annotations

import sys

from dlrm_cache.cli.common import command
from dlrm_cache.config import PreprocessRunConfig
from dlrm_cache.data.memory_budget import map_large_allocations
from dlrm_cache.data.preprocess import preprocess


def _preprocess(config: PreprocessRunConfig) -> None:
    map_large_allocations()  # preprocess.memory_gb bounds what is resident, not what malloc keeps
    out = preprocess(config)
    print(f"dlrm-preprocess: {out} ({out / 'metadata.json'})")


main = command("dlrm-preprocess", "preprocess", PreprocessRunConfig, _preprocess)

if __name__ == "__main__":
    sys.exit(main())
