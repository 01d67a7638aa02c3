"""How a column of fixed-size bags is stored: a bag of ``size`` ids a row as one fixed-size binary value
of ``size`` little-endian integers (int32, or int64 for tables of 2^31 rows or more), never null.

Parquet stores a list column with repetition and definition levels for every id, and pyarrow decodes
them at 5-10 ns an id (MLPerf's bags: 214 ids a sample); a fixed-size binary column of the same ids is
one value a row with no levels, decoded 3-9x faster, and read back as a (rows, size) array without a copy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ID_BYTES = (4, 8)  # int32 or int64 ids


def bag_type(id_type: pa.DataType, size: int) -> pa.DataType:
    """The column type of bags of ``size`` ids of ``id_type`` (int32 or int64)."""
    return pa.binary(id_type.byte_width * size)


def id_bytes(column_type: pa.DataType, size: int) -> int | None:
    """The bytes of an id in ``column_type`` holding bags of ``size`` ids; None if it holds none."""
    if not pa.types.is_fixed_size_binary(column_type) or size < 1:
        return None
    width = column_type.byte_width
    return width // size if width % size == 0 and width // size in ID_BYTES else None


def to_array(bags: np.ndarray, column_type: pa.DataType) -> pa.FixedSizeBinaryArray:
    """A (rows, size) array of ids as a column of ``column_type`` (``bag_type``)."""
    rows, size = bags.shape
    dtype = np.dtype(f"<i{column_type.byte_width // size}")
    data = np.ascontiguousarray(bags, dtype=dtype)
    return pa.FixedSizeBinaryArray.from_buffers(column_type, rows, [None, pa.py_buffer(data)])


def to_numpy(column: pa.Array, size: int) -> np.ndarray:
    """A column of bags of ``size`` ids as a (rows, size) array: a view of its buffer."""
    width = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], dtype=f"<i{width // size}")
    start = column.offset * size
    return data[start : start + len(column) * size].reshape(len(column), size)
