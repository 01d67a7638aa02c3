"""``dlrm-predict``: a trained run's click probabilities for new data, one per input line, in order.

dlrm-predict run_dir=outputs/2026-12-01/10-00-00-4242 input=/data/criteo/test.txt output=submission.csv
dlrm-predict run_dir=runs/a input=/data/day31_pq split=test output=day31.csv   # a preprocessed folder
"""

from __future__ import annotations

import sys

from dlrm_cache.cli.common import command
from dlrm_cache.config import PredictConfig
from dlrm_cache.train.predict import predict


def _predict(config: PredictConfig) -> None:
    out = predict(config)
    print(f"dlrm-predict: {out}")


main = command("dlrm-predict", "predict", PredictConfig, _predict)

if __name__ == "__main__":
    sys.exit(main())
