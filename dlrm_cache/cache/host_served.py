"""Rows a step serves from the host tier (no cache slot: a batch needs more rows than its table's cache
holds), moved without the training thread ever waiting for the device.

- Read at plan time (the bookkeeping thread): the rows' values from the host, except the rows the step
  in flight updates on the host; those are taken at the gather from that step's updated rows, still on
  the device (``HostServed``).
- Written back lazily: the training thread queues a step's updated rows on a non-blocking copy to the
  host (``HostWrites.queue``); whoever reads the host tier next writes them in first (``settle``): the
  next plan (those of the steps before the one in flight), a flush, an evaluation, a rebuild.

Exact: a row's host value is read only once every update of it queued before is written in, or is
taken from the device where it is not yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HostServed:
    """Where each of a step's host-served rows comes from (positions into the batch's unique rows)."""

    read_at: Tensor  # positions of the rows read from the host at plan time
    values: Tensor  # (len(read_at), width) their values, read then
    updated_at: Tensor  # positions of the rows the step before updates on the host
    update_index: Tensor  # where each of those sits among that step's updated rows
    after_step: int  # that step

    @classmethod
    def plan(
        cls, host: Tensor, rows: Tensor, positions: Tensor, inflight: Tensor | None, step: int
    ) -> HostServed:
        """``rows`` (sorted) at ``positions``, for step ``step``; ``inflight``: the rows (sorted) that
        step ``step - 1``, in flight, serves from the host and will update there."""
        if inflight is None:
            inflight = rows[:0]
        updated = torch.isin(rows, inflight)
        read = ~updated
        index = torch.searchsorted(inflight, rows[updated])
        return cls(positions[read], host.index_select(0, rows[read]), positions[updated], index, step - 1)

    def index_tensors(self) -> dict[str, Tensor]:
        """What the gather needs on the device, by name (``StepPlan.on_device``)."""
        return {"read_at": self.read_at, "values": self.values, "updated_at": self.updated_at,
                "update_index": self.update_index}  # fmt: skip


@dataclass
class _Queued:
    step: int
    rows: Tensor  # global rows (sorted)
    values: Tensor  # on the host (pinned on CUDA), filled by a copy that ``done`` marks
    done: torch.cuda.Event | None


class HostWrites:
    """Updated host-served rows on their way to the host tier (see the module docstring)."""

    def __init__(self) -> None:
        # The training thread appends, the bookkeeping thread pops (deque's append and popleft are
        # atomic); one thread at a time settles (the collection drains its thread first).
        self._queue: deque[_Queued] = deque()
        self.last: tuple[int, Tensor] | None = None  # (step, its updated rows on the device)

    def queue(self, step: int, rows: Tensor, updated: Tensor, to_host: Callable) -> None:
        """Training thread: step ``step``'s updated ``rows`` (``updated``, on the device) on their way to
        the host; ``to_host(t) -> (copy, event)`` starts the copy."""
        values, done = to_host(updated)
        self._queue.append(_Queued(step, rows, values, done))
        self.last = (step, updated)

    def settle(self, host: Tensor, before: int | None = None) -> None:
        """Write into ``host`` the rows of the steps before ``before`` (None: every step), in step order;
        waits for their copies (on the caller's thread)."""
        while self._queue and (before is None or self._queue[0].step < before):
            q = self._queue.popleft()
            if q.done is not None:
                q.done.synchronize()
            host.index_copy_(0, q.rows, q.values)

    def updated_by(self, step: int) -> Tensor:
        """Step ``step``'s updated rows on the device (a gather of the next step takes some)."""
        if self.last is None or self.last[0] != step:
            have = None if self.last is None else self.last[0]
            raise RuntimeError(f"the rows updated at step {step} are wanted; the last update is of {have}")
        return self.last[1]
