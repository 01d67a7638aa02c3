"""What identifies a batch, so that each forward checks its batch is the one handed to ``enqueue``.

A signature is the batch's keys and sizes (host metadata) and position-weighted checksums of its ids and
bag lengths (reordered ids differ), computed where the ids are. Ids on the host compare at once. Ids on
a device (after TorchRec's input distribution) compare there, with no host sync: the verdict stays on
the device (``FeedCheck``) until the collection next waits anyway (``stats``, ``flush``, evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dlrm_cache.cache import prepare
from dlrm_cache.native_build import NativeUnavailable

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

WRONG_FEED = (
    "forward() got a batch other than the next one handed to enqueue(): enqueue every training batch, "
    "in the order forward() will see them"
)


@dataclass(frozen=True)
class Signature:
    shape: tuple  # keys, stride, number of ids
    sums: torch.Tensor  # (2,) int64 checksums of the ids and the bag lengths, on the ids' device

    @classmethod
    def of(cls, kjt: KeyedJaggedTensor, pin: bool = False) -> Signature:
        """``pin``: host checksums in pinned memory (compared later on a CUDA device without a sync)."""
        values, lengths = kjt.values(), kjt.lengths()
        sums = torch.stack([position_checksum(values), position_checksum(lengths)])
        return cls((tuple(kjt.keys()), kjt.stride(), values.numel()), sums.pin_memory() if pin else sums)

    def matches(self, other: Signature) -> bool:
        """Compared on the host (a sync where a signature's checksums are on a device)."""
        return self.shape == other.shape and torch.equal(self.sums.cpu(), other.sums.cpu())


class FeedCheck:
    """Signatures compared on a device; the verdict read where the caller waits for the device anyway."""

    def __init__(self) -> None:
        self._wrong: torch.Tensor | None = None  # on the device: whether any batch so far was wrong

    def compare(self, got: Signature, expected: Signature) -> None:
        if got.shape != expected.shape:  # host metadata: known at once
            raise ValueError(WRONG_FEED)
        wrong = (got.sums != expected.sums.to(got.sums.device, non_blocking=True)).any()
        self._wrong = wrong if self._wrong is None else self._wrong | wrong

    def raise_if_wrong(self) -> None:
        wrong, self._wrong = self._wrong, None
        if wrong is not None and bool(wrong):
            raise ValueError(WRONG_FEED)


def position_checksum(t: torch.Tensor) -> torch.Tensor:
    """``sum((i + 1) * t[i])`` in int64 (wrapping around), as a 0-d tensor on ``t``'s device: in one C++
    pass for host int64/int32 tensors, where the library builds; with torch's operations elsewhere."""
    kernel = {torch.int64: "checksum_i64", torch.int32: "checksum_i32"}.get(t.dtype)
    if kernel is not None and t.device.type == "cpu":
        try:
            lib = prepare.library()  # prepare.cpp holds the checksum kernels
        except NativeUnavailable:  # no compiler: torch's operations below
            pass
        else:
            t = t.contiguous()
            return torch.tensor(getattr(lib, kernel)(t.data_ptr(), t.numel()), dtype=torch.int64)
    t = t.to(torch.int64)
    return (t * torch.arange(1, len(t) + 1, dtype=torch.int64, device=t.device)).sum()
