"""The built-in default dataset: generated Criteo-format data, preprocessed once."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from dlrm_cache.config import PreprocessOptions, PreprocessRunConfig, SynthConfig
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate

log = logging.getLogger(__name__)


def synthetic_dataset(
    folder: Path,
    rows: int,
    cardinality_scale: float,
    seed: int = 0,
    row_group_rows: int = PreprocessOptions.row_group_rows,
    progress: bool = True,
    cardinalities: str = "kaggle",
    options: PreprocessOptions | None = None,
) -> Path:
    """Generated Criteo-format data (``folder/train.txt``, made once; ``cardinalities``: the profile,
    kaggle or terabyte) preprocessed into ``folder/parquet`` with ``options`` (reused when already made
    from it): ``dlrm-train``'s built-in default, and the data of the tests and benchmarks. Returns the
    preprocessed folder. The TSV is made again when it was made with other ``rows``,
    ``cardinality_scale``, ``seed`` or ``cardinalities`` (``train.txt.json`` says which)."""
    tsv, made_with = folder / "train.txt", folder / "train.txt.json"
    wanted = {"rows": rows, "cardinality_scale": cardinality_scale, "seed": seed}
    if cardinalities != "kaggle":  # what datasets made before the profile was a choice say
        wanted["cardinalities"] = cardinalities
    try:
        current = tsv.exists() and json.loads(made_with.read_text()) == wanted
    except (OSError, ValueError):
        current = False
    if not current:
        if tsv.exists():
            log.info("%s was made with other data.synthetic_* values: making it again", tsv)
        made_with.unlink(missing_ok=True)
        synth = SynthConfig(rows=rows, out=str(tsv), seed=seed, cardinality_scale=cardinality_scale,
                            cardinalities=cardinalities, layout="kaggle", progress=progress,
                            overwrite=True)  # fmt: skip
        generate(synth)
        made_with.write_text(json.dumps(wanted))
    options = replace(options or PreprocessOptions(), progress=progress, row_group_rows=row_group_rows)
    return preprocess(
        PreprocessRunConfig(
            input=[str(tsv)], output_dir=str(folder / "parquet"), preprocess=options, overwrite=not current
        )
    )
