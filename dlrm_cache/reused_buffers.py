"""Host buffers handed out again once nothing holds them any more.

Memory fresh from the system costs a page fault per 4 KiB page on its first write (on this project's
VMs ~1-4 us each: a multi-hot batch's ids, tens of MB, paid ~30 ms a batch in faults alone while the
lookahead queue held eight of them). A buffer is reused once no tensor refers to its memory (torch's
count of a storage's users: every view counts), so what is handed out can be kept as long as the caller
likes; the buffers kept are as many as were held at once, each up to 1.25x the largest taken (a buffer
outgrown is replaced with room to spare, so that sizes that vary batch to batch settle).
"""

from __future__ import annotations

import threading

import torch

try:  # the count of a storage's users: a private torch function (absent: every buffer is fresh)
    _use_count = torch._C._storage_Use_Count
except AttributeError:  # pragma: no cover - depends on the torch build
    _use_count = None


def _users(buf: torch.Tensor) -> int:
    return _use_count(buf.untyped_storage()._cdata)


class ReusedBuffers:
    """One-dimensional buffers of one dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._kept: list[tuple[torch.Tensor, int]] = []  # (buffer, its users when nothing else holds it)
        self._lock = threading.Lock()

    def take(self, n: int) -> torch.Tensor:
        """``n`` elements of uninitialised memory, a view of a buffer nothing else holds."""
        with self._lock:
            if _use_count is None:
                return torch.empty(n, dtype=self.dtype)
            for i, (buf, alone) in enumerate(self._kept):
                if _users(buf) == alone:
                    if len(buf) < n:  # grown (with room for the next few): the small one is dropped
                        buf = torch.empty(n + n // 4, dtype=self.dtype)
                        self._kept[i] = (buf, _users(buf))
                    return buf[:n]
            buf = torch.empty(n, dtype=self.dtype)
            self._kept.append((buf, _users(buf)))
            return buf[:n]

    def __len__(self) -> int:
        return len(self._kept)

    def __reduce__(self):
        """A copy (``copy.deepcopy``, pickle) starts with no buffers of its own."""
        return ReusedBuffers, (self.dtype,)
