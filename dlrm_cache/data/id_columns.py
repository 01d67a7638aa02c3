"""The categorical ids of a run of rows, as the loader cuts, shuffles and joins them into batches: one id
per row and feature (``OneHotIds``, Criteo), or a bag per row and feature (``BagIds``: multi-hot), of
any length (``Bags``) or of one size (``FixedBags``).

Ids stay in the integer type the Parquet columns hold (zero-copy from pyarrow) until a batch is made:
``kjt`` then writes them, as int64, into the buffer it is given, in one pass."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Rows = slice | np.ndarray  # consecutive rows, or any rows (in that order)


class OneHotIds:
    """(features, rows) ids."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[1]

    def size(self) -> int:
        return self.ids.size

    def take(self, rows: Rows) -> OneHotIds:
        return OneHotIds(self.ids[:, rows])

    def then(self, more: OneHotIds) -> OneHotIds:
        return OneHotIds(np.concatenate([self.ids, more.ids], axis=1))

    def kjt(self, keys: list[str], values: torch.Tensor) -> KeyedJaggedTensor:
        """The batch, its ids written into ``values`` (int64, ``size()`` of them)."""
        np.copyto(values.numpy().reshape(self.ids.shape), self.ids, casting="unsafe")  # checked ids
        return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(len(values), dtype=torch.int32))


class Bags:
    """One feature's bags of any length: ``offsets`` (rows + 1, from 0) into ``values``."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self.offsets, self.values = offsets, values

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self) -> np.ndarray:
        return self.values

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: Rows) -> Bags:
        off, val = self.offsets, self.values
        if isinstance(rows, slice):
            lo, hi, _ = rows.indices(len(self))
            return Bags(off[lo : hi + 1] - off[lo], val[off[lo] : off[hi]])
        starts, lengths = off[rows], off[rows + 1] - off[rows]
        new = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new[1:])
        return Bags(new, val[np.repeat(starts - new[:-1], lengths) + np.arange(new[-1])])

    def then(self, more: Bags) -> Bags:
        return Bags(
            np.concatenate([self.offsets, more.offsets[1:] + self.offsets[-1]]),
            np.concatenate([self.values, more.values]),
        )


class FixedBags:
    """One feature's bags of one size: a (rows, size) array."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def ids(self) -> np.ndarray:
        return self.values.reshape(-1)

    def lengths(self) -> np.ndarray:
        return np.full(len(self.values), self.values.shape[1])

    def take(self, rows: Rows) -> FixedBags:
        return FixedBags(self.values[rows])

    def then(self, more: FixedBags) -> FixedBags:
        return FixedBags(np.concatenate([self.values, more.values]))


class BagIds:
    """Per feature, the rows' bags (``Bags`` or ``FixedBags``)."""

    def __init__(self, features: list[Bags | FixedBags]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features[0])

    def size(self) -> int:
        return sum(f.ids().size for f in self.features)

    def take(self, rows: Rows) -> BagIds:
        return BagIds([f.take(rows) for f in self.features])

    def then(self, more: BagIds) -> BagIds:
        return BagIds([a.then(b) for a, b in zip(self.features, more.features, strict=True)])

    def kjt(self, keys: list[str], values: torch.Tensor) -> KeyedJaggedTensor:
        """The batch, its ids written into ``values`` (int64, ``size()`` of them)."""
        lengths = np.concatenate([f.lengths() for f in self.features]).astype(np.int32)
        np.concatenate([f.ids() for f in self.features], out=values.numpy(), casting="unsafe")  # checked ids
        return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.from_numpy(lengths))
