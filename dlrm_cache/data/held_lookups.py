"""The write pass's re-numbering in bounded memory: every feature's ``IdLookup``, held in memory while
they all fit the room the budget leaves them (with the next one being made: ``reserve``), else all on
disk and applied a group at a time.

On disk, the features are packed in input order into groups whose lookups fit the room together (a
feature whose lookup alone is larger makes a group of its own: that lookup is the floor, said in the
log). Every group but the last is applied in a pass of its own over the parsed rows, its ids written
beside them (``ids_path``, ``id_table``); the last group is applied in the write pass, which reads
those ids back batch by batch. The tables written are the same as with every lookup in memory, so
are the bytes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa

from dlrm_cache.config import GB
from dlrm_cache.criteo import CAT_COLUMNS
from dlrm_cache.data import fixed_bags
from dlrm_cache.data.multi_hot import BagLookup, load_lookup
from dlrm_cache.data.vocab import IdLookup

log = logging.getLogger(__name__)


class HeldLookups:
    """The lookups of the 26 features, ``add``-ed in ``CAT_COLUMNS`` order."""

    def __init__(self, folder: Path, room: int):
        self.folder, self.room = folder, room
        self._held: list[IdLookup | BagLookup | None] = []  # None: on disk, in folder/<feature>
        self.sizes: list[int] = []  # ids per feature
        self.rare_ids: list[int] = []
        self.nbytes: list[int] = []

    @property
    def on_disk(self) -> bool:
        return any(lookup is None for lookup in self._held)

    def reserve(self, nbytes: int) -> None:
        """Room for a lookup of ``nbytes`` about to be made beside the held ones: they go to disk first
        if together they would not fit."""
        if sum(self.nbytes) + nbytes > self.room:
            self._to_disk()

    def add(self, lookup: IdLookup | BagLookup) -> None:
        self.sizes.append(lookup.size)
        self.rare_ids.append(lookup.rare_id)
        self.nbytes.append(lookup.nbytes)
        self._held.append(lookup)
        if self.on_disk or sum(self.nbytes) > self.room:
            self._to_disk()

    def _to_disk(self) -> None:
        if not self.folder.exists():
            self.folder.mkdir()
        for j, held in enumerate(self._held):
            if held is not None:
                held.save(self.folder / CAT_COLUMNS[j])
                self._held[j] = None

    def groups(self) -> list[list[int]]:
        """The features by group, in order: one group when every lookup is in memory."""
        if not self.on_disk:
            return [list(range(len(self._held)))]
        groups: list[list[int]] = [[]]
        for j, size in enumerate(self.nbytes):
            if groups[-1] and sum(self.nbytes[i] for i in groups[-1]) + size > self.room:
                groups.append([])
            groups[-1].append(j)
        largest = max(self.nbytes)
        log.info(
            "the re-numbering (%.2f GB) is larger than preprocess.memory_gb leaves it (%.2f GB): applied "
            "in %d groups of features, %d pass(es) over the parsed rows before the write pass",
            sum(self.nbytes) / GB, self.room / GB, len(groups), len(groups) - 1,
        )  # fmt: skip
        if largest > self.room:
            log.warning(
                "the largest feature's re-numbering alone (%s, %.2f GB) is larger than preprocess.memory_gb "
                "leaves it (%.2f GB): raise preprocess.memory_gb by %.2f, or preprocess.min_count",
                CAT_COLUMNS[self.nbytes.index(largest)], largest / GB, self.room / GB,
                (largest - self.room) / GB,
            )  # fmt: skip
        return groups

    def load(self, group: list[int]) -> dict[int, IdLookup | BagLookup]:
        """The lookups of ``group``'s features, by feature index (read from disk where they are)."""
        return {j: self._held[j] or load_lookup(self.folder / CAT_COLUMNS[j]) for j in group}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def ids_path(folder: Path, group: int, spill: int) -> Path:
    """Where a group's ids of one spill's rows go (an Arrow IPC file, a batch per spilled batch)."""
    return folder / f"_ids-{group}-{spill}.arrow"


def id_table(batch: pa.RecordBatch, lookups: dict[int, IdLookup | BagLookup], schema: pa.Schema,
             pool) -> pa.Table:  # fmt: skip
    """``batch``'s categorical columns of ``lookups``' features re-numbered (side by side on ``pool``:
    the lookups release the GIL), named and typed as ``schema`` (the output's) has them: an id a row, or
    a bag a row (``fixed_bags``) where the lookup makes bags (``BagLookup``)."""

    def ids(j: int) -> pa.Array:
        raw, kind = batch.column(CAT_COLUMNS[j]).to_numpy(), schema.field(CAT_COLUMNS[j]).type
        if isinstance(lookups[j], BagLookup):
            return fixed_bags.to_array(lookups[j].transform(raw), kind)
        return pa.array(lookups[j].transform(raw, kind.to_pandas_dtype()), type=kind)  # no copy

    features = sorted(lookups)
    return pa.Table.from_arrays(list(pool.map(ids, features)), names=[CAT_COLUMNS[j] for j in features])
