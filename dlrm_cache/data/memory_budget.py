"""How ``dlrm-preprocess`` shares ``preprocess.memory_gb`` out: the fixed costs of its processes and
chunks, and the rest to the value counters, which spill to disk past their share."""

from __future__ import annotations

import ctypes
import os
from contextlib import suppress
from dataclasses import dataclass

from dlrm_cache.config import GB, PreprocessOptions
from dlrm_cache.criteo import CAT_COLUMNS
from dlrm_cache.data.spilled_counts import BYTES_PER_VALUE

PROCESS_BYTES = 200 << 20  # a process's own: Python, numpy, pyarrow (measured: ~180 MB)
CHUNK_COPIES = 6  # a chunk in flight: its text, the parsed arrays, the spilled table, the next one read ahead
MIN_COUNTING = 64 << 20  # the least the counters may share
WRITE_ROW_BYTES = 400  # a row buffered by a part's Parquet writer (arrow, encoding)
PLOT_BYTES = 64 << 20  # the skew report's plot (matplotlib), drawn during the write pass


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryBudget:
    total: int  # bytes
    fixed: int  # what the parse takes whatever the input: its processes and their chunks
    write_fixed: int  # what the write pass takes besides the vocabularies
    values_per_feature: int  # distinct values a feature's counter holds before it spills
    write_threads: int  # parts written side by side
    partition_bytes: int  # spilled counts of a feature merged at a time while ranking (a piece)


def memory_budget(opts: PreprocessOptions, processes: int) -> MemoryBudget:
    """``preprocess.memory_gb`` (0: half the RAM) for ``processes`` parsing processes (1: in this one).
    Refused when below the fixed costs, with the smallest value that works."""
    total = int(opts.memory_gb * GB) if opts.memory_gb else machine_ram() // 2
    own = PROCESS_BYTES * (processes + 1 if processes > 1 else 1)  # the parsers, and this process
    fixed = own + processes * CHUNK_COPIES * (opts.chunk_mb << 20)
    # A part being written holds a row group and two spilled chunks (one re-numbered ahead); the parts
    # written side by side take at most half of what the write pass leaves the lookups.
    per_part = opts.row_group_rows * WRITE_ROW_BYTES + 2 * (opts.chunk_mb << 20)
    wanted = opts.workers or os.cpu_count() or 1
    write_threads = max(1, min(wanted, (total - PROCESS_BYTES - PLOT_BYTES) // (2 * per_part)))
    write_fixed = PROCESS_BYTES + write_threads * per_part + PLOT_BYTES
    write_least = PROCESS_BYTES + per_part + PLOT_BYTES  # one part at a time
    smallest = max(fixed + MIN_COUNTING, write_least)
    if total < smallest:
        raise ValueError(
            f"preprocess.memory_gb={opts.memory_gb:g}: below the fixed costs ({processes} parsing "
            f"process(es) with preprocess.chunk_mb={opts.chunk_mb}: {fixed / GB:.2f} GB; the write pass "
            f"with preprocess.row_group_rows={opts.row_group_rows}: {write_least / GB:.2f} GB); the smallest "
            f"that works is {-(-smallest * 100 // GB) / 100:.2f} (or lower preprocess.chunk_mb, "
            "preprocess.workers or preprocess.row_group_rows)"
        )
    per_feature = (total - fixed) // (processes * len(CAT_COLUMNS) * BYTES_PER_VALUE)
    # Ranking holds the lookups within the room the write pass leaves them, and up to three pieces
    # of counts (~1.5x a piece's bytes each) in what the writers and the plot take later.
    partition_bytes = max(8 << 20, (write_fixed - PROCESS_BYTES) // 5)
    return MemoryBudget(total, fixed, write_fixed, max(1, per_feature), write_threads, partition_bytes)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations() -> None:
    """Large arrays mapped and unmapped whole, in this process (the ``dlrm-preprocess`` command and its
    parsing processes, not the library's callers): glibc otherwise raises its mmap threshold to the
    size of the first large block freed and serves later ones from its heap, which does not shrink
    (measured: a peak 130 MB higher at a 0.45 GB budget). A no-op without glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)
