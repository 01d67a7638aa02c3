"""The vocabularies of a finished ``dlrm-preprocess`` output, read back (``vocab_from``): what encodes
new data (tomorrow's log, Kaggle's ``test.txt``) with the ids a model was trained on.

A dataset's ``vocab/cat_N.parquet`` holds, per id, the raw value (8 hex digits; null for the empty
value and for the rare bucket), whether it is the rare bucket, and its train count: exactly what
``Vocabulary`` is made of. Reading it back gives the same re-numbering the dataset was written with.
``write_vocabulary`` writes it, a row group at a time (from memory, or from a vocabulary ranked on disk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlrm_cache.criteo import CAT_COLUMNS
from dlrm_cache.data.criteo_tsv import MISSING, hex_to_int
from dlrm_cache.data.synthetic import hash_to_hex
from dlrm_cache.data.vocab import Vocabulary
from dlrm_cache.files import naming

VOCAB_COLUMNS = ["id", "raw", "is_rare", "train_count"]
_SCHEMA = pa.schema(
    [("id", pa.int64()), ("raw", pa.string()), ("is_rare", pa.bool_()), ("train_count", pa.int64())]
)
MULTI_HOT_OPTIONS = ("multi_hot_sizes", "multi_hot_distribution", "multi_hot_seed")


@dataclass
class SavedVocabularies:
    """What a dataset's ``metadata.json`` says of its vocabularies; ``read()`` loads them."""

    root: Path
    sizes: dict[str, int]  # ids per feature
    rare_ids: dict[str, int]
    max_ind_range: int
    identity: dict  # the source dataset's inputs and options: a change to them is a different encoding
    vocab_id: str | None  # the source's ``metadata.json`` ``vocab_id`` (None: written before ids existed)
    multi_hot: dict  # the source's ``preprocess.multi_hot_*`` options: its ids expand to the same bags

    def read_each(self) -> Iterator[Vocabulary]:
        """The vocabularies, ``CAT_COLUMNS`` order, one at a time, each checked against the metadata."""
        for c in CAT_COLUMNS:
            yield _read_one(self.root / "vocab" / f"{c}.parquet", self.sizes[c], self.rare_ids[c])

    def check(self) -> None:
        """Raise what ``read_each`` would (a missing or damaged vocabulary), holding one at a time."""
        for _ in self.read_each():
            pass


def write_vocabulary(path: Path, vocab) -> None:
    """``vocab`` (a ``Vocabulary`` or a ``SpilledVocabulary``: its ``chunks()`` and ``rare_id``) into
    ``path``, a row group per chunk. No dictionary pages: ids and raw values are all distinct."""
    first = 0
    with naming(path), pq.ParquetWriter(path, _SCHEMA, use_dictionary=False) as writer:
        for raw, count in vocab.chunks():
            ids = np.arange(first, first + len(raw))
            is_rare = ids == vocab.rare_id
            null = is_rare | (raw < 0)
            hexes = pa.array(hash_to_hex(np.where(null, 0, raw)), pa.binary(), mask=null).cast(pa.string())
            columns = [pa.array(ids), hexes, pa.array(is_rare), pa.array(count)]
            writer.write_table(pa.Table.from_arrays(columns, schema=_SCHEMA))
            first += len(raw)


def saved_vocabularies(root: Path) -> SavedVocabularies:
    """The vocabularies of the dataset in ``root`` (``vocab_from``), from its metadata alone."""
    meta_path = root / "metadata.json"
    if not root.is_dir():
        raise FileNotFoundError(f"vocab_from={root}: no such folder")
    try:
        meta = json.loads(meta_path.read_text())
    except OSError:
        raise ValueError(f"vocab_from={root}: not a dlrm-preprocess output (no metadata.json)") from None
    except ValueError as e:
        raise ValueError(f"{meta_path}: not a readable metadata file ({e})") from None
    sizes = meta.get("vocab_sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(CAT_COLUMNS):
        raise ValueError(
            f"{meta_path}: no vocabularies of the 26 Criteo features (vocab_sizes): not a dataset "
            "dlrm-preprocess wrote"
        )
    identity = {
        "path": str(root.resolve()),
        "inputs": meta.get("inputs"),
        "preprocess": meta.get("preprocess"),
    }
    options = meta.get("preprocess") or {}
    multi_hot = {k: options[k] for k in MULTI_HOT_OPTIONS if k in options}
    return SavedVocabularies(
        root, sizes, meta["rare_ids"], int(meta.get("max_ind_range", 0)), identity, meta.get("vocab_id"),
        multi_hot,
    )  # fmt: skip


def missing_vocabulary(path: Path) -> str:
    """What to say of a dataset whose vocabulary file ``path`` is gone."""
    return (
        f"{path}: missing: the dataset {path.parent.parent} is incomplete (the vocabulary of "
        f"{path.stem}); make it again with dlrm-preprocess"
    )


def _read_one(path: Path, size: int, rare_id: int) -> Vocabulary:
    if not path.is_file():
        raise FileNotFoundError(missing_vocabulary(path))
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable vocabulary ({e})") from None
    if table.schema.names != VOCAB_COLUMNS:
        raise ValueError(f"{path}: columns {table.schema.names}, expected {VOCAB_COLUMNS}")
    ids = table.column("id").to_numpy()
    is_rare = table.column("is_rare").to_numpy(zero_copy_only=False)
    if (
        len(ids) != size
        or not np.array_equal(ids, np.arange(size))
        or np.flatnonzero(is_rare).tolist() != [rare_id]
    ):
        raise ValueError(
            f"{path}: {len(ids)} ids, expected {size} in order with the rare bucket at {rare_id} "
            "(metadata.json): the vocabulary and the metadata do not belong together"
        )
    raw_column = table.column("raw")
    raw, valid = hex_to_int(pc.fill_null(raw_column, ""))
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(f"{path}: id {bad}: raw value {raw_column[bad].as_py()!r} is not 8 hex digits")
    raw[rare_id] = np.iinfo(np.int64).max  # as Vocabulary keeps it
    null = pc.is_null(raw_column).to_numpy(zero_copy_only=False) & ~is_rare
    raw[null] = MISSING
    counts = table.column("train_count").cast(pa.int64()).to_numpy()
    return Vocabulary(raw, counts, rare_id)
