"""Row copies between the host tier and a CUDA device cache that overlap the step's compute.

The host tier stays pageable (a pinned copy of the tables would double their footprint: torch's
caching host allocator rounds a pinned block up to a power of two and keeps it). Rows travel through
pinned staging buffers, sized by a step's loads and write-backs and reused (grown by doubling), on a
copy stream of their own; events order the copies with compute:

- before the copy stream touches any slot, it waits for the compute stream's last recorded update
  (``after_update``): a victim's slot is read (written back) and overwritten (loaded) only after the
  steps that used it are done;
- loads and write-backs are queued on the copy stream in the planner's order (write-backs first), so a
  victim is copied out before its slot is reused;
- a step's gather waits for the event recorded after its own loads (``StepPlan.ready``); the compute
  stream waits, the host does not.

Only the bookkeeping thread (which calls ``load`` and ``write_back``) ever waits on the host: for a
staging buffer's previous copy before refilling it, and for a write-back's copy before the rows go
into the host tier. The training thread never synchronises with the device here.

Verified on the CPU by reading only (the CPU path copies rows in place, ``RowKernels`` or torch); the
CUDA check (``scripts/gpu_check.sh``) runs this module on a GPU.
"""

from __future__ import annotations

import torch


class _Staging:
    """A pinned (rows, width) buffer, reused; refilled only once the copy that read it last is done."""

    def __init__(self, width: int):
        self.width = width
        self.buffer = torch.empty(0, width, pin_memory=True)
        self.busy: torch.cuda.Event | None = None

    def take(self, n: int) -> torch.Tensor:
        if self.busy is not None:
            self.busy.synchronize()  # the bookkeeping thread waits, not the training thread
        if n > len(self.buffer):
            self.buffer = torch.empty(max(n, 2 * len(self.buffer)), self.width, pin_memory=True)
        return self.buffer[:n]


class DeviceTransfers:
    """Loads and write-backs of one cache, on a copy stream (see the module's docstring)."""

    def __init__(self, device: torch.device, width: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._loads = _Staging(width)
        self._write_backs = _Staging(width)
        self._updated: torch.cuda.Event | None = None  # the compute stream's last update
        self.ready: torch.cuda.Event | None = None  # after the latest loads
        # (start, end) timing events of every load's copies, where a benchmark asks for them
        self.load_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def after_update(self) -> None:
        """Training thread, after a step's update is queued: later copies wait for it."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._updated = event

    def _begin(self) -> None:
        updated = self._updated
        if updated is not None:
            self.stream.wait_event(updated)

    def write_back(
        self, cache: torch.Tensor, slots: torch.Tensor, host: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Cache ``slots`` into host ``rows`` (their data is in the host when this returns)."""
        staging = self._write_backs.take(len(slots))
        with torch.cuda.stream(self.stream):
            self._begin()
            staging.copy_(cache.index_select(0, slots.to(self.device, non_blocking=True)), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()
        host.index_copy_(0, rows, staging)

    def load(self, host: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Host ``rows`` into cache ``slots``, queued on the copy stream; ``ready`` marks them done."""
        staging = self._loads.take(len(rows))
        torch.index_select(host, 0, rows, out=staging)
        with torch.cuda.stream(self.stream):
            self._begin()
            timing = None if self.load_timings is None else _timed(self.stream)
            on_device = staging.to(self.device, non_blocking=True)
            cache.index_copy_(0, slots.to(self.device, non_blocking=True), on_device)
            done = torch.cuda.Event()
            done.record(self.stream)
            if timing is not None:
                self.load_timings.append((timing, _timed(self.stream)))
        self._loads.busy = done
        self.ready = done

    def wait_ready(self, event: torch.cuda.Event | None) -> None:
        """Training thread: the compute stream waits for a step's loads (the host does not)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def _timed(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event
