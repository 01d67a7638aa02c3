"""The categorical ids of a run of rows, as the loader cuts, shuffles and joins them into batches: one id
per row and feature (``OneHotIds``, Criteo), or a bag of any length (``BagIds``: multi-hot).

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


class BagIds:
    """Per feature, the rows' bags: ``offsets[f]`` (rows + 1, from 0) into ``values[f]``."""

    def __init__(self, offsets: list[np.ndarray], values: list[np.ndarray]):
        self.offsets, self.values = offsets, values

    def __len__(self) -> int:
        return len(self.offsets[0]) - 1

    def size(self) -> int:
        return sum(len(v) for v in self.values)

    def take(self, rows: Rows) -> BagIds:
        offsets, values = [], []
        for off, val in zip(self.offsets, self.values, strict=True):
            if isinstance(rows, slice):
                lo, hi, _ = rows.indices(len(off) - 1)
                offsets.append(off[lo : hi + 1] - off[lo])
                values.append(val[off[lo] : off[hi]])
                continue
            starts, lengths = off[rows], off[rows + 1] - off[rows]
            new = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            offsets.append(new)
            values.append(val[np.repeat(starts - new[:-1], lengths) + np.arange(new[-1])])
        return BagIds(offsets, values)

    def then(self, more: BagIds) -> BagIds:
        offsets = [
            np.concatenate([a, b[1:] + a[-1]]) for a, b in zip(self.offsets, more.offsets, strict=True)
        ]
        values = [np.concatenate([a, b]) for a, b in zip(self.values, more.values, strict=True)]
        return BagIds(offsets, values)

    def kjt(self, keys: list[str], values: torch.Tensor) -> KeyedJaggedTensor:
        """The batch, its ids written into ``values`` (int64, ``size()`` of them)."""
        lengths = np.concatenate([np.diff(off) for off in self.offsets]).astype(np.int32)
        np.concatenate(self.values, out=values.numpy(), casting="unsafe")  # checked ids
        return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.from_numpy(lengths))
