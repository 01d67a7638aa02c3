"""Eviction priorities: for each cached slot, a key; the slots with the largest keys go first.

All keys are int64 tensors over a table's slot range, computed from host-side bookkeeping:

- ``lru``: the step of last use (oldest first).
- ``lfu``: the row's access count since training began (kept for every row, also while it is out of
  the cache; least frequent first).
- ``freq``: a static priority from train frequency (Colossal-AI's cache): given counts, or, for ids
  re-numbered by frequency, the id itself (larger id = colder).
- ``lookahead``: Belady's rule inside the window of future batches the trainer handed over, frequency
  beyond it: rows not needed in the window go first, least frequent first; then window rows, the one
  needed farthest in the future first.
"""

from __future__ import annotations

import torch

NO_NEXT_USE = 1 << 20  # "not needed inside the window"; larger than any window length
_FREQ_BITS = 40


def lru_key(last_used: torch.Tensor) -> torch.Tensor:
    return -last_used


def frequency_key(frequency: torch.Tensor) -> torch.Tensor:
    return -frequency


def lookahead_key(next_use: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """``next_use``: the window position (1 = the next batch) of each slot's next use, or NO_NEXT_USE."""
    return (next_use << _FREQ_BITS) - frequency.clamp(max=(1 << _FREQ_BITS) - 1)
