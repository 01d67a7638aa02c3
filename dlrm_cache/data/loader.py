"""Batches from a ``dlrm-preprocess`` output: Parquet read row group by row group, in a background
thread, as TorchRec ``Batch``es (dense features, a ``KeyedJaggedTensor`` of one id per feature,
labels).

Batches are global: with ``world_size`` ranks each batch of ``batch_size`` rows is cut into equal
consecutive shares, rank 0's first, so every rank sees its part of the same global batch.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.criteo import CAT_COLUMNS, INT_COLUMNS

SCHEMA_VERSIONS = (1,)  # metadata.json versions this loader reads
_PREFETCH = 8  # batches read ahead by the background thread


def load_metadata(root: Path) -> dict:
    """``metadata.json`` of a preprocessed dataset, with clear errors for anything else."""
    meta_path = root / "metadata.json"
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={root}: no such folder")
    if not meta_path.is_file():
        raise ValueError(f"data.path={root}: not a dlrm-preprocess output (no metadata.json)")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta.get("schema_version")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{meta_path}: not a readable metadata file ({e})") from None
    if version not in SCHEMA_VERSIONS:
        raise ValueError(
            f"{meta_path}: schema_version {version!r} is not one this version reads {SCHEMA_VERSIONS}"
        )
    return meta


COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]


def _footer(path: Path) -> pq.FileMetaData:
    """A part's footer (no data read), refused unless it is a readable part with the dataset's columns."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet part ({e})") from None
    names = meta.schema.names
    if names != COLUMNS:
        raise ValueError(f"{path}: columns {names[:3]}... ({len(names)}), expected {COLUMNS[:3]}... (40)")
    return meta


class ParquetBatches:
    def __init__(
        self,
        root: Path,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        pin_memory: bool = False,
        pad_shares: bool = False,
    ):
        """``pin_memory``: pin each batch in the background thread (for fast copies to a CUDA device).
        ``pad_shares``: a last, partial batch gives every rank the same number of rows (sharded models
        need equal shares), the missing ones copies of the batch's first row with label -1."""
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} does not divide over {world_size} ranks")
        self.split = split
        files = sorted((root / split).glob("part-*.parquet"))
        if not files:
            raise ValueError(f"{root / split}: no part-*.parquet files")
        footers = [_footer(f) for f in files]
        self.groups = [(f, g) for f, m in zip(files, footers, strict=True) for g in range(m.num_row_groups)]
        self.rows = sum(m.num_rows for m in footers)
        expected = load_metadata(root)["rows"][split]
        if self.rows != expected:
            raise ValueError(
                f"{root / split}: its parts hold {self.rows} rows, metadata.json says {expected} "
                "(a part missing, added or replaced)"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.pin_memory = shuffle, seed, drop_last, pin_memory
        self.pad_shares = pad_shares
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.rows, self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (its own shuffle), after the first ``skip`` (resuming)."""
        q: queue.Queue = queue.Queue(maxsize=_PREFETCH)
        stop = threading.Event()

        def produce() -> None:
            try:
                for i, b in enumerate(self._read(epoch)):
                    if stop.is_set():
                        return
                    if i >= skip:
                        q.put(b.pin_memory() if self.pin_memory else b)
                q.put(None)
            except BaseException as e:  # handed to the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="dlrm-loader")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def _read(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.groups)) if self.shuffle else range(len(self.groups))
        carry: list[np.ndarray] | None = None
        files: dict[Path, pq.ParquetFile] = {}
        for gi in order:
            path, g = self.groups[gi]
            pf = files.setdefault(path, pq.ParquetFile(path))
            t = pf.read_row_group(g)
            cols = [
                t.column("label").to_numpy(),
                *(t.column(c).to_numpy() for c in INT_COLUMNS + CAT_COLUMNS),
            ]
            label = cols[0].astype(np.float32)
            dense = np.stack(cols[1:14], axis=1).astype(np.float32)
            cats = np.stack(cols[14:], axis=1).astype(np.int64)
            if self.shuffle:  # within the row group
                perm = rng.permutation(len(label))
                label, dense, cats = label[perm], dense[perm], cats[perm]
            if carry is not None:
                label, dense, cats = (
                    np.concatenate([a, b]) for a, b in zip(carry, (label, dense, cats), strict=True)
                )
            full = len(label) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._batch(label, dense, cats, start, start + self.batch_size)
            carry = [a[full:] for a in (label, dense, cats)]
        if carry is not None and len(carry[0]) and not self.drop_last:
            yield self._batch(*carry, 0, len(carry[0]))

    def _batch(self, label, dense, cats, start: int, stop: int) -> Batch:
        if self.pad_shares:
            share = -(-(stop - start) // self.world_size)
            lo = min(stop, start + self.rank * share)
            hi = min(stop, lo + share)
        else:
            share = (stop - start) // self.world_size
            lo = start + self.rank * share
            hi = stop if self.rank == self.world_size - 1 else lo + share
        rows: slice | np.ndarray = slice(lo, hi)  # a view, unless padding
        labels = label[lo:hi]
        pad = share - (hi - lo) if self.pad_shares else 0
        if pad:
            rows = np.concatenate([np.arange(lo, hi), np.full(pad, start)])
            labels = np.concatenate([labels, np.full(pad, -1, dtype=label.dtype)])
        n = len(labels)
        ids = torch.from_numpy(np.ascontiguousarray(cats[rows].T).reshape(-1))
        kjt = KeyedJaggedTensor(
            keys=CAT_COLUMNS, values=ids, lengths=torch.ones(n * len(CAT_COLUMNS), dtype=torch.int32)
        )
        return Batch(
            dense_features=torch.from_numpy(dense[rows]),
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
        )
