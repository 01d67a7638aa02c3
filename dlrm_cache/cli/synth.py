"""``dlrm-synth``: write synthetic Criteo-format click logs.

dlrm-synth rows=200000 out=data/synth/train.txt
dlrm-synth rows=1000000 out=data/synth/train.txt.gz gzip=true zipf=1.1 cardinality_scale=0.01
dlrm-synth rows=2400000 layout=terabyte days=24 gzip=true out=data/synth_1tb
dlrm-synth labeled=false out=data/synth/test.txt          # the 39-field Kaggle test.txt layout
dlrm-synth format=parquet cardinalities=terabyte cardinality_scale=0.001 preprocess.max_ind_range=40000 \
    'preprocess.multi_hot_sizes=[3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1]' out=data/mlperf_pq
"""

from __future__ import annotations

import json
import sys

from dlrm_cache.cli.common import command
from dlrm_cache.config import SynthConfig
from dlrm_cache.data.synthetic import generate


def _synth(config: SynthConfig) -> None:
    if config.format == "parquet":
        from dlrm_cache.data.generated_dataset import generated_dataset  # pyarrow's Parquet: only here

        out = generated_dataset(config)
        rows = json.loads((out / "metadata.json").read_text())["rows"]
        print(f"dlrm-synth: wrote the dataset {out} ({rows['train']} train, {rows['val']} val, "
              f"{rows['test']} test rows)")  # fmt: skip
        return
    paths = generate(config)
    total = sum(p.stat().st_size for p in paths)
    print(
        f"dlrm-synth: wrote {len(paths)} file(s), {total / 1e6:.1f} MB: {paths[0]}"
        + (" ..." if len(paths) > 1 else "")
    )


main = command("dlrm-synth", "synth", SynthConfig, _synth, log_info=False)

if __name__ == "__main__":
    sys.exit(main())
