"""The write pass of ``dlrm-preprocess``: the parsed rows, re-numbered, into the splits' part files,
the parts written side by side.

The parse spills each input's rows as an Arrow IPC file, a record batch per parsed chunk, and says of
each batch its rows and its first and last line (``BatchIndex``). From that the pass is planned
(``plan``): every split's rows are a sequence of pieces (a batch's rows of that split, in input order;
a file's lines go train, val, test), cut into parts of ``preprocess.max_file_rows`` rows. Each part is
then written by a task of its own on ``threads`` threads: reading, the lookups and Parquet's encoding
release the GIL, and the lookups are shared, not copied per process. A piece is one ``write_table``
call, so the row groups, and the bytes, are the same whatever the threads. A spill is deleted once
every part that reads it is written.

Where the lookups are applied a group at a time (``held_lookups``), every group but the last is applied
first, a pass each, into id files of a batch per spilled batch, read back by the parts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dlrm_cache.criteo import CAT_COLUMNS, INT_COLUMNS
from dlrm_cache.data.held_lookups import HeldLookups, id_table, ids_path
from dlrm_cache.files import naming

SPLITS = ("train", "val", "test")
T = TypeVar("T")


@dataclass(frozen=True)
class BatchIndex:
    """A spilled record batch: its rows, its first and last line (lines increase within a file)."""

    rows: int
    first_line: int
    last_line: int


@dataclass(frozen=True)
class Piece:
    spill: int  # the input's number
    batch: int
    lo: int  # its rows lo..hi-1
    hi: int


@dataclass
class Part:
    split: str
    number: int  # part-<number>.parquet
    pieces: list[Piece] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.hi - p.lo for p in self.pieces)


def plan(
    spills: list[Path], index: list[list[BatchIndex]], bounds: list[tuple[int, int]], max_rows: int
) -> list[Part]:
    """The parts of every split, in order: rows up to each file's last train line (``bounds``) train,
    then up to its last val line val, the rest test; every split has one part at least (an empty
    split, one empty file). A batch across a boundary has its lines read from its spill."""
    sequences: dict[str, list[Piece]] = {s: [] for s in SPLITS}
    for n, (spill, batches, (train_end, val_end)) in enumerate(zip(spills, index, bounds, strict=True)):
        lines_of = _lines_reader(spill)
        for i, b in enumerate(batches):
            if b.last_line <= train_end:
                ends = [b.rows, b.rows]
            elif b.first_line > val_end:
                ends = [0, 0]
            elif b.first_line > train_end and b.last_line <= val_end:
                ends = [0, b.rows]
            else:
                ends = np.searchsorted(lines_of(i), [train_end, val_end], side="right").tolist()
            for s, lo, hi in zip(SPLITS, [0, *ends], [*ends, b.rows], strict=True):
                if hi > lo:
                    sequences[s].append(Piece(n, i, lo, hi))
    parts = []
    for s in SPLITS:
        part = Part(s, 0)
        for piece in sequences[s]:
            lo = piece.lo
            while lo < piece.hi:
                if part.rows == max_rows:
                    parts.append(part)
                    part = Part(s, part.number + 1)
                take = min(piece.hi - lo, max_rows - part.rows)
                part.pieces.append(Piece(piece.spill, piece.batch, lo, lo + take))
                lo += take
        parts.append(part)
    return parts


def _lines_reader(spill: Path) -> Callable[[int], np.ndarray]:
    def lines(i: int) -> np.ndarray:
        with pa.OSFile(str(spill)) as source:
            return pa.ipc.open_file(source).get_batch(i).column("line").to_numpy()

    return lines


@dataclass
class WritePass:
    """What the parts are written from and how: the spills, the lookups (``held``), the output schema
    and Parquet settings."""

    spills: list[Path]
    held: HeldLookups
    schema: pa.Schema
    dictionary: list[str]  # the columns written with dictionary pages
    row_group_rows: int
    threads: int

    def run(self, parts: list[Part], folder: Path, progress: bool) -> None:
        """Every group of lookups but the last into id files, then every part into
        ``folder/<split>/part-<number>.parquet``; a progress bar (rows) per pass."""
        groups = self.held.groups()
        total = sum(p.rows for p in parts)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="dlrm-preprocess-ids") as features:
            self._features = features
            for g, group in enumerate(groups[:-1]):
                lookups = self.held.load(group)
                with _bar(f"ids {g + 1}/{len(groups) - 1}", total, progress) as on_rows:
                    for n, spill in enumerate(self.spills):
                        _write_ids(
                            spill, ids_path(spill.parent, g, n), lookups, self.schema, features, on_rows
                        )
                del lookups
            self._lookups = self.held.load(groups[-1])
            self._earlier_groups = len(groups) - 1
            for s in SPLITS:
                (folder / s).mkdir(parents=True)
            self._readers = {n: 0 for n in range(len(self.spills))}  # pieces still to write, per spill
            for part in parts:
                for piece in part.pieces:
                    self._readers[piece.spill] += 1
            self._lock = threading.Lock()
            for n, count in self._readers.items():
                if not count:
                    self._release(n)
            # Parts in the order of their first piece: the spills are read, and deleted, in order.
            ordered = sorted(
                parts, key=lambda p: (p.pieces[0].spill, p.pieces[0].batch) if p.pieces else (-1, 0)
            )
            with (
                _bar("write", total, progress) as on_rows,
                ThreadPoolExecutor(self.threads, thread_name_prefix="dlrm-preprocess-parts") as pool,
            ):
                futures = [pool.submit(self._write_part, p, folder, on_rows) for p in ordered]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

    def _write_part(self, part: Part, folder: Path, on_rows: Callable[[int], None]) -> None:
        path = folder / part.split / f"part-{part.number:05d}.parquet"
        with ExitStack() as opened:
            spill_readers: dict[int, list] = {}

            def batch(piece: Piece) -> pa.Table:
                if piece.spill not in spill_readers:
                    paths = [self.spills[piece.spill]]
                    paths += [
                        ids_path(self.spills[piece.spill].parent, g, piece.spill)
                        for g in range(self._earlier_groups)
                    ]
                    spill_readers[piece.spill] = [
                        pa.ipc.open_file(opened.enter_context(pa.OSFile(str(p)))) for p in paths
                    ]
                rows = piece.hi - piece.lo
                spilled, *done = (
                    r.get_batch(piece.batch).slice(piece.lo, rows) for r in spill_readers[piece.spill]
                )
                return renumbered(spilled, self._lookups, done, self.schema, self._features)

            tables = read_ahead(batch(p) for p in part.pieces)
            with naming(path), pq.ParquetWriter(path, self.schema, use_dictionary=self.dictionary) as writer:
                for piece, table in zip(part.pieces, tables, strict=True):
                    writer.write_table(table, row_group_size=self.row_group_rows)
                    on_rows(piece.hi - piece.lo)
        for n in {p.spill for p in part.pieces}:
            with self._lock:
                self._readers[n] -= sum(1 for p in part.pieces if p.spill == n)
                last = self._readers[n] == 0
            if last:
                self._release(n)

    def _release(self, n: int) -> None:
        """Spill ``n`` and its id files, once no part reads them any more."""
        self.spills[n].unlink()
        for g in range(self._earlier_groups):
            ids_path(self.spills[n].parent, g, n).unlink(missing_ok=True)  # none for an empty input


def renumbered(
    batch: pa.RecordBatch,
    lookups: dict,
    done: list[pa.RecordBatch],
    schema: pa.Schema,
    pool: ThreadPoolExecutor,
) -> pa.Table:
    """``batch``'s columns, its categorical values re-numbered by ``lookups`` (feature index ->
    ``IdLookup``) or taken from ``done`` (the same rows' ids, written by earlier passes)."""
    ids = id_table(batch, lookups, schema, pool)
    by_name = {name: ids.column(name) for name in ids.column_names}
    for more in done:
        by_name.update({name: more.column(name) for name in more.schema.names})
    cols = [batch.column("label"), *(batch.column(c) for c in INT_COLUMNS)]
    cols += [by_name[c] for c in CAT_COLUMNS]
    return pa.Table.from_arrays(cols, schema=schema)


def _write_ids(spill: Path, out: Path, lookups: dict, schema: pa.Schema, pool, on_rows) -> None:
    """The ids of ``lookups``' features for the rows of ``spill``: a batch per spilled batch, into ``out``."""
    with pa.OSFile(str(spill)) as source, naming(out), pa.OSFile(str(out), "wb") as sink:
        reader = pa.ipc.open_file(source)
        writer = None
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            ids = id_table(batch, lookups, schema, pool)
            if writer is None:
                writer = pa.ipc.new_file(sink, ids.schema)
            writer.write_table(ids)
            on_rows(batch.num_rows)
        if writer is not None:
            writer.close()


@contextmanager
def _bar(desc: str, rows: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A tqdm bar in rows; what it yields takes rows done, from any thread."""
    lock = threading.Lock()
    with tqdm(
        total=rows, unit="row", unit_scale=True, desc=f"dlrm-preprocess {desc}", disable=not enabled
    ) as bar:

        def update(n: int) -> None:
            with lock:
                bar.update(n)

        yield update


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items`` in order, the next one made on a thread while the caller works on the current one
    (chunks read and parsed while one is counted and spilled; pieces re-numbered while one is written).
    One item ahead: memory stays bounded by the chunk size."""
    with ThreadPoolExecutor(1, thread_name_prefix="dlrm-preprocess-ahead") as ahead:
        pending = ahead.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = ahead.submit(next, items, None)
            yield item
