"""Batches from a ``dlrm-preprocess`` output: Parquet read row group by row group, in a background
thread, as TorchRec ``Batch``es (dense features, a ``KeyedJaggedTensor`` of each row's ids, labels);
each row group is decoded by pyarrow on a thread of its own while the one before is cut into batches.

The categorical columns hold one id a row (integers), or, where ``metadata.json`` has
``multi_hot_sizes``, a bag a row: lists of integers (a size of 0 there allows bags of any length, empty
ones too), or, for bags of one size, the fixed-size binary values ``fixed_bags`` describes (what
``dlrm-preprocess`` writes). What the footers can tell is checked before the first batch: the column
types, the ids per row of fixed-size bags, ids beyond their table (``vocab_sizes``) from the columns'
statistics; every list's bag lengths, and the ids of fixed-size binary bags, are checked as they are read.

Batches are global: with ``world_size`` ranks each batch of ``batch_size`` rows is cut into equal
consecutive shares, rank 0's first, so every rank sees its part of the same global batch.
"""

from __future__ import annotations

import atexit
import json
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch

from dlrm_cache.criteo import CAT_COLUMNS, INT_COLUMNS
from dlrm_cache.data import fixed_bags
from dlrm_cache.data.id_columns import BagIds, Bags, FixedBags, OneHotIds
from dlrm_cache.reused_buffers import ReusedBuffers

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
    sizes = meta.get("multi_hot_sizes")
    if sizes is not None and (
        not isinstance(sizes, dict)
        or sorted(sizes) != sorted(CAT_COLUMNS)
        or not all(isinstance(n, int) and n >= 0 for n in sizes.values())
    ):
        raise ValueError(
            f"{meta_path}: multi_hot_sizes {str(sizes)[:80]}: expected ids per bag (>= 0; 0: any) for "
            "each of cat_0 .. cat_25, or null (one id a row)"
        )
    return meta


COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
# Epochs being read: (stop, producer thread, its queue). Any left when the interpreter exits (an epoch
# not read to its end, its generator still referenced) are stopped first: a producer still inside
# pyarrow as the process ends aborts it ("terminate called without an active exception").
_reading: set[tuple[threading.Event, threading.Thread, queue.Queue]] = set()


def _stop(stop: threading.Event, thread: threading.Thread, q: queue.Queue) -> None:
    """Stop a producer and wait for it, unblocking it where it waits on a full queue."""
    stop.set()
    while thread.is_alive():
        try:
            q.get_nowait()
        except queue.Empty:
            thread.join(0.01)


@atexit.register
def _stop_reading() -> None:
    for reading in list(_reading):
        _stop(*reading)


def _footer(path: Path, meta: dict) -> pq.FileMetaData:
    """A part's footer (no data read), refused unless it is a readable part with the dataset's columns,
    its bags and ids as ``meta`` (``metadata.json``) says."""
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet part ({e})") from None
    schema = file.schema_arrow
    if schema.names != COLUMNS:
        names = schema.names
        raise ValueError(f"{path}: columns {names[:3]}... ({len(names)}), expected {COLUMNS[:3]}... (40)")
    sizes = meta.get("multi_hot_sizes")
    fixed = set()  # the columns of fixed-size bags (fixed_bags)
    for c in CAT_COLUMNS:
        kind = schema.field(c).type
        if sizes is None:
            if not pa.types.is_integer(kind):
                raise ValueError(f"{path}: {c} is {kind}, but metadata.json says one id a row (no "
                                 "multi_hot_sizes): expected integers")  # fmt: skip
            continue
        if fixed_bags.id_bytes(kind, sizes[c]):
            fixed.add(c)
            continue
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(
            kind.value_type
        ):
            width = f"{4 * sizes[c]} or {8 * sizes[c]}-byte binary" if sizes[c] else "no fixed-size binary"
            raise ValueError(f"{path}: {c} is {kind}, but metadata.json says bags of {sizes[c] or 'any'} "
                             f"ids (multi_hot_sizes): expected a list of integers ({width})")  # fmt: skip
    footer = file.metadata
    leaves = {footer.schema.column(i).path.split(".")[0]: i for i in range(footer.num_columns)}
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in CAT_COLUMNS:
            chunk = group.column(leaves[c])
            size = 1 if sizes is None or c in fixed else sizes[c]
            if size and group.num_rows * size != chunk.num_values:
                raise ValueError(
                    f"{path}: row group {g}: {c} holds {chunk.num_values} ids for {group.num_rows} rows, "
                    f"metadata.json says {size} a row"
                )
            stats = chunk.statistics
            if (
                c not in fixed  # bytes: its ids are checked as they are read
                and stats is not None
                and stats.has_min_max
                and (stats.min < 0 or stats.max >= meta["vocab_sizes"][c])
            ):
                _beyond(path, g, c, stats.min if stats.min < 0 else stats.max, meta["vocab_sizes"][c])
    return footer


def _beyond(path: Path, g: int, c: str, bad: int, rows: int) -> None:
    raise ValueError(
        f"{path}: row group {g}: {c} holds id {bad}, beyond its table of {rows} rows "
        "(metadata.json vocab_sizes)"
    )


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
        meta = load_metadata(root)
        self.vocab_sizes: dict[str, int] = meta["vocab_sizes"]
        self.bag_sizes: dict[str, int] | None = meta.get("multi_hot_sizes")
        footers = [_footer(f, meta) for f in files]
        self.groups = [(f, g) for f, m in zip(files, footers, strict=True) for g in range(m.num_row_groups)]
        self.rows = sum(m.num_rows for m in footers)
        expected = meta["rows"][split]
        if self.rows != expected:
            raise ValueError(
                f"{root / split}: its parts hold {self.rows} rows, metadata.json says {expected} "
                "(a part missing, added or replaced)"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.pin_memory = shuffle, seed, drop_last, pin_memory
        self.pad_shares = pad_shares
        self.epoch = 0
        self._values = ReusedBuffers(torch.int64)  # the batches' ids (fresh memory: a page fault per 4 KiB)

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
        reading = (stop, thread, q)
        _reading.add(reading)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            _stop(*reading)
            _reading.discard(reading)

    def _read(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.groups)) if self.shuffle else range(len(self.groups))
        with ThreadPoolExecutor(1, thread_name_prefix="dlrm-loader-read") as reader:
            yield from self._batches(order, reader, rng)

    def _batches(self, order, reader: ThreadPoolExecutor, rng) -> Iterator[Batch]:
        """The row groups in ``order``, each read (decoded by pyarrow) on ``reader`` while the one before
        is cut into batches. Parts are memory-mapped: pyarrow decodes from the page cache instead of
        reading each column chunk into a new buffer first (with its threads decoding columns side by
        side, a multi-hot row group of 131,072 rows: ~30 ms against 130-170 ms here)."""
        files: dict[Path, pq.ParquetFile] = {}

        def read(gi: int) -> pa.Table:
            path, g = self.groups[gi]
            return files.setdefault(path, pq.ParquetFile(path, memory_map=True)).read_row_group(g)

        order = list(order)
        ahead = reader.submit(read, order[0]) if order else None
        carry: tuple | None = None  # the rows of the row groups before that fill no whole batch
        for i, gi in enumerate(order):
            path, g = self.groups[gi]
            t = ahead.result()
            ahead = reader.submit(read, order[i + 1]) if i + 1 < len(order) else None
            label = t.column("label").to_numpy().astype(np.float32)
            dense = np.stack([t.column(c).to_numpy() for c in INT_COLUMNS], axis=1).astype(np.float32)
            cats = self._ids(t, path, g)
            if self.shuffle:  # within the row group
                perm = rng.permutation(len(label))
                label, dense, cats = label[perm], dense[perm], cats.take(perm)
            start = 0
            if carry is not None and len(carry[0]):  # joined with only the rows that complete its batch
                start = min(len(label), self.batch_size - len(carry[0]))
                carry = _joined(carry, (label[:start], dense[:start], cats.take(slice(0, start))))
                if len(carry[0]) < self.batch_size:
                    continue
                yield self._batch(*carry, 0, self.batch_size)
            full = start + (len(label) - start) // self.batch_size * self.batch_size
            for at in range(start, full, self.batch_size):
                yield self._batch(label, dense, cats, at, at + self.batch_size)
            carry = (label[full:], dense[full:], cats.take(slice(full, len(label))))
        if carry is not None and len(carry[0]) and not self.drop_last:
            yield self._batch(*carry, 0, len(carry[0]))

    def _ids(self, t: pa.Table, path: Path, g: int) -> OneHotIds | BagIds:
        """A row group's categorical ids; bags checked against ``multi_hot_sizes``, fixed-size ones'
        ids against their tables (their columns' statistics do not say)."""
        if self.bag_sizes is None:
            return OneHotIds(np.stack([t.column(c).to_numpy() for c in CAT_COLUMNS]))
        features: list[Bags | FixedBags] = []
        for c in CAT_COLUMNS:
            size = self.bag_sizes[c]
            column = _one_array(t.column(c))
            if pa.types.is_fixed_size_binary(column.type):
                if column.null_count:
                    raise ValueError(f"{path}: row group {g}: {c} holds a null bag")
                bags = fixed_bags.to_numpy(column, size)
                unsigned = bags.view(f"<u{bags.itemsize}")  # a negative id: beyond any table
                rows = self.vocab_sizes[c]
                if len(bags) and unsigned.max() >= rows:
                    _beyond(path, g, c, int(bags.reshape(-1)[np.argmax(unsigned.reshape(-1) >= rows)]), rows)
                features.append(FixedBags(bags))
                continue
            ids = column.flatten()
            if ids.null_count:
                raise ValueError(f"{path}: row group {g}: {c} holds a null id in a bag")
            off = column.offsets.to_numpy().astype(np.int64)
            off -= off[0]
            if size and not (np.diff(off) == size).all():
                row = int(np.flatnonzero(np.diff(off) != size)[0])
                got = off[row + 1] - off[row]
                raise ValueError(f"{path}: row group {g}, row {row}: {c} holds a bag of {got} ids, "
                                 f"metadata.json's multi_hot_sizes say {size}")  # fmt: skip
            features.append(Bags(off, ids.to_numpy()))
        return BagIds(features)

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
        return Batch(
            dense_features=torch.from_numpy(dense[rows]),
            sparse_features=(ids := cats.take(rows)).kjt(CAT_COLUMNS, self._values.take(ids.size())),
            labels=torch.from_numpy(labels),
        )


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """A column as one array: its chunk where it has one (``combine_chunks`` copies even that)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _joined(first: tuple, then: tuple) -> tuple:
    """Rows (labels, dense, ids) followed by more rows."""
    return (np.concatenate([first[0], then[0]]), np.concatenate([first[1], then[1]]), first[2].then(then[2]))
