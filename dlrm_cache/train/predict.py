"""``dlrm-predict``: a trained run's click probability for every line of new data, in input order.

Raw TSV is first encoded with the run's dataset's vocabulary (``dlrm-preprocess vocab_from=...
all_into=test`` into a temporary folder beside the output, removed at the end), so it gets exactly the
ids and dense transform the model trained on; a preprocessed folder is read as it is (``split``). The
rows stream through the model a batch at a time (the run's batch size: the same scores as the run's own
evaluation); the CSV is written under a temporary name and renamed: it appears whole or not at all.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dlrm_cache.config import PredictConfig, PreprocessOptions, PreprocessRunConfig
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.data.preprocess import preprocess, resolve_inputs
from dlrm_cache.files import atomic_file
from dlrm_cache.train.errors import TrainingError
from dlrm_cache.train.trained_run import TrainedRun, load_run

KAGGLE_TEST_NAMES = ("test.txt", "test.txt.gz")
log = logging.getLogger(__name__)


def predict(cfg: PredictConfig) -> Path:
    """Score ``cfg.input`` with ``cfg.run_dir``'s model into ``cfg.output``; returns the output."""
    out = Path(cfg.output)
    if out.is_dir():
        raise FileExistsError(f"output={out} is a folder, not a file")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output={out} exists; pass overwrite=true to replace it")
    folder = _preprocessed_folder(cfg.input)
    files = [] if folder else resolve_inputs(cfg.input)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA device is available")
    run = load_run(Path(cfg.run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.encoded-", dir=out.parent) as work:
        if folder is None:
            root, split = _encode(cfg, run, files, Path(work) / "data"), "test"
        else:
            root, split = folder, cfg.split
        meta = _matching_metadata(root, run, "input")
        labeled = any(meta["labeled"])
        kaggle = cfg.format == "kaggle" or (
            cfg.format == "auto" and len(files) == 1 and files[0].name in KAGGLE_TEST_NAMES and not labeled
        )
        loader = ParquetBatches(root, split, cfg.batch_size or run.batch_size, drop_last=False)
        if loader.rows == 0:
            what = f"input={cfg.input}" if folder is None else f"input={folder} split={split}"
            raise ValueError(f"{what}: no rows to score")
        if cfg.host == "memory":
            _score(run.plain_model(device), loader, device, out, kaggle, labeled, cfg, ids_on_device=True)
        else:
            try:
                model, ebc = run.cached_model(replace(run.cache, host="mmap", mmap_dir=cfg.mmap_dir), device)
            except OSError as e:  # the host tier names the setting as training has it: say this command's
                message = (e.strerror or str(e)).replace("cache.mmap_dir=", "mmap_dir=", 1)
                raise OSError(e.errno, message, e.filename) from None
            try:
                _score(model, loader, device, out, kaggle, labeled, cfg, ids_on_device=False)
            finally:
                ebc.close()
    return out


def _matching_metadata(root: Path, run: TrainedRun, what: str) -> dict:
    """``root``'s metadata, refused unless its vocabulary is the run's: the same sizes and, where both
    record it, the same encoding (``vocab_id``: ids of the same values)."""
    meta = load_metadata(root)
    if run.vocab_id and meta.get("vocab_id") and meta["vocab_id"] != run.vocab_id:
        raise ValueError(
            f"{what} {root}: encoded with another vocabulary than the run's (vocab_id {meta['vocab_id']}, "
            f"the run's {run.vocab_id}): its ids mean other values; preprocess it with vocab_from=<the "
            "run's dataset>"
        )
    if meta["vocab_sizes"] != run.vocab_sizes():
        differ = next(f for f, n in run.vocab_sizes().items() if meta["vocab_sizes"].get(f) != n)
        raise ValueError(
            f"{what} {root}: encoded with another vocabulary than the run's ({differ}: "
            f"{meta['vocab_sizes'].get(differ)} ids, the run's table {run.vocab_sizes()[differ]} rows); "
            "preprocess it with vocab_from=<the run's dataset>"
        )
    return meta


def _preprocessed_folder(inputs: list[str]) -> Path | None:
    """The input when it is one folder (a dlrm-preprocess output), else None (TSV files)."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return Path(inputs[0])
    if any(Path(i).is_dir() for i in inputs):
        raise ValueError(f"input={inputs}: a folder (a preprocessed dataset) is scored alone, not in a list")
    return None


def _encode(cfg: PredictConfig, run: TrainedRun, files: list[Path], into: Path) -> Path:
    """``files`` encoded with the vocabulary of the run's dataset, every line into ``test``."""
    data = Path(cfg.data_path) if cfg.data_path else run.data_path
    if data is None:
        raise ValueError(
            f"run_dir={run.run_dir} does not record the dataset it trained on: pass data_path=<its "
            "dlrm-preprocess output> (whose vocabulary encodes the input)"
        )
    if not (data / "metadata.json").is_file():
        where = f"data_path={data}" if cfg.data_path else f"the run's dataset {data}"
        raise FileNotFoundError(
            f"{where}: not a dlrm-preprocess output (no metadata.json); pass data_path=<the dataset the "
            "run trained on>"
        )
    _matching_metadata(data, run, "data_path")  # before any input is parsed
    options = PreprocessOptions(progress=cfg.progress, on_bad_lines="error")
    return preprocess(
        PreprocessRunConfig(
            input=[str(f) for f in files],
            output_dir=str(into),
            vocab_from=str(data),
            all_into="test",
            preprocess=options,
        )  # fmt: skip
    )


@torch.no_grad()
def _score(
    model: torch.nn.Module,
    loader: ParquetBatches,
    device: torch.device,
    out: Path,
    kaggle: bool,
    labeled: bool,
    cfg: PredictConfig,
    ids_on_device: bool,
) -> None:
    """``ids_on_device``: the plain model takes the ids where it computes; the cache, on the host."""
    header = "Id,Predicted" if kaggle else "probability,label" if labeled else "probability"
    row = cfg.first_id
    with (
        atomic_file(out) as f,
        tqdm(
            total=loader.rows, desc="dlrm-predict", unit="row", unit_scale=True, disable=not cfg.progress
        ) as bar,
    ):
        f.write((header + "\n").encode())
        for batch in loader.batches(epoch=0):
            ids = batch.sparse_features.to(device) if ids_on_device else batch.sparse_features
            logits = model(batch.dense_features.to(device), ids).squeeze(1)
            scores = torch.sigmoid(logits).cpu().numpy()
            if not np.isfinite(scores).all():  # nothing is written: the CSV goes with the failure
                at = int(np.flatnonzero(~np.isfinite(scores))[0])
                raise ValueError(
                    f"the model scores {scores[at]} for input row {row - cfg.first_id + at}: its "
                    f"checkpoint ({cfg.run_dir}) or the input is damaged; no output written"
                )
            text = [f"{p:.9g}" for p in scores.tolist()]  # 9 digits: the float32 exactly
            if kaggle:
                text = [f"{row + i},{p}" for i, p in enumerate(text)]
            elif labeled:
                text = [f"{p},{int(y)}" for p, y in zip(text, batch.labels.numpy(), strict=True)]
            f.write(("\n".join(text) + "\n").encode())
            row += len(scores)
            bar.update(len(scores))
    log.info("dlrm-predict: %d rows scored into %s", loader.rows, out)


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """A ``dlrm-predict`` CSV's columns (for checks and notebooks)."""
    with open(path) as f:
        names = f.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    return {name: data[:, j] for j, name in enumerate(names)}
