"""Eviction priorities: for each cached slot, a key; the slots with the largest keys go first.

All keys are int64 tensors over a table's slot range, computed from host-side bookkeeping:

- ``lru``: the step of last use (oldest first).
- ``lfu``: the row's access count since training began (kept for every row, also while it is out of
  the cache; least frequent first).
- ``freq``: a static priority from train frequency (Colossal-AI's cache): given counts, or, for ids
  re-numbered by frequency, the id itself (larger id = colder).
- ``lookahead``: Belady's rule inside the window of future batches the trainer handed over, frequency
  beyond it: rows not needed in the window go first, least frequent first; then window rows, the one
  needed farthest in the future first. Next uses come from ``future.FutureIndex``.

``lfu`` and ``freq`` use the "coldness" key alone (least frequent first).
"""

from __future__ import annotations

import torch

NO_NEXT_USE = (1 << 32) - 1  # "no use known": later than any batch sequence number
COLDNESS_BITS = 31
MAX_COLDNESS = (1 << COLDNESS_BITS) - 1


def coldness_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """A non-negative key that grows as a row gets colder, from access or train counts."""
    return MAX_COLDNESS - counts.clamp(0, MAX_COLDNESS)


def lru_key(last_used: torch.Tensor) -> torch.Tensor:
    return -last_used


def lookahead_key(next_use: torch.Tensor, coldness: torch.Tensor) -> torch.Tensor:
    """Farthest next use first (rows with none known before all others); then the coldest."""
    return (next_use << COLDNESS_BITS) | coldness.clamp(0, MAX_COLDNESS)
