"""``dlrm-synth format=parquet``: generated rows as a ``dlrm-preprocess`` dataset, multi-hot ones too.

The rows are written as Criteo TSV into a folder beside the output (``.NAME-tsv-PID``: what a killed
run leaves there is removed by the next one), preprocessed into the output with ``preprocess.*``
(MLPerf's bags: ``preprocess.multi_hot_sizes``) and the layout's split (kaggle: by fraction; terabyte:
the last day halved into val and test), and removed.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import replace
from pathlib import Path

from dlrm_cache.config import DatasetConfig, PreprocessOptions, PreprocessRunConfig, SynthConfig
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate
from dlrm_cache.files import remove_dead


def generated_dataset(cfg: SynthConfig) -> Path:
    """The dataset ``cfg`` describes, in the folder ``cfg.out``; returns it. Refused before any work
    when that folder holds something and ``overwrite`` is false."""
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise FileExistsError(f"out={out} already exists (pass overwrite=true to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead(out.parent.glob(f".{glob.escape(out.name)}-tsv-*"), r"-tsv-(\d+)$", "generated TSV")
    lines = out.parent / f".{out.name}-tsv-{os.getpid()}"
    shutil.rmtree(lines, ignore_errors=True)
    try:
        target = lines / ("days" if cfg.layout == "terabyte" else "train.txt")
        files = generate(replace(cfg, out=str(target), format="tsv", preprocess=PreprocessOptions()))
        split = "last_file" if cfg.layout == "terabyte" else "fraction"
        dataset = DatasetConfig(name=f"synthetic_{cfg.layout}", split=split)
        options = replace(cfg.preprocess, progress=cfg.progress)
        run = PreprocessRunConfig(input=[str(f) for f in files], output_dir=str(out), overwrite=cfg.overwrite,
                                  dataset=dataset, preprocess=options)  # fmt: skip
        return preprocess(run)
    finally:
        shutil.rmtree(lines, ignore_errors=True)
