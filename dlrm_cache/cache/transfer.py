"""Row copies between the host tier and a CUDA device cache that overlap the step's compute.

The host tier stays pageable (a pinned copy of the tables would double their footprint: torch's
caching host allocator rounds a pinned block up to a power of two and keeps it). Rows travel through
pinned staging buffers, sized by a step's loads and write-backs and reused (grown by doubling), on a
copy stream of their own; events order the copies with compute:

- before the copy stream touches a plan's slots, it waits for the update of the last step that may
  have used them (``after_update`` records one event per step; a plan for step ``t`` evicts only
  slots last used before its pin floor, so its copies wait for step ``pin_floor - 1``'s update, not
  for the step in flight): a victim's slot is read (written back) and overwritten (loaded) only after
  the steps that used it are done, and loads overlap the step in flight;
- the copy stream is drawn from the high-priority pool (NCCL's streams come from the other);
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

# the events of the last few steps' updates kept (a plan needs the one before the step in flight)
_KEPT_UPDATES = 4


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
        self.stream = torch.cuda.Stream(device, priority=-1)  # not a stream NCCL may be given too
        self._loads = _Staging(width)
        self._write_backs = _Staging(width)
        self._updates: dict[int, torch.cuda.Event] = {}  # step -> the compute stream's update of it
        self.ready: torch.cuda.Event | None = None  # after the latest loads
        # (start, end) timing events of every load's copies, where a benchmark asks for them
        self.load_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def staged_bytes(self) -> int:
        """The pinned host memory of the staging buffers (a check of bounded memory reads it)."""
        return self._loads.buffer.nbytes + self._write_backs.buffer.nbytes

    def after_update(self, step: int) -> None:
        """Training thread, after step ``step``'s update is queued: copies that need it wait for it."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        updates = dict(self._updates)  # replaced whole: the bookkeeping thread reads it meanwhile
        updates[step] = event
        self._updates = {s: e for s, e in updates.items() if s > step - _KEPT_UPDATES}

    def _begin(self, after: int | None) -> None:
        """The copy stream waits for the update of step ``after`` (the latest one recorded at or
        before it: the compute stream runs in order), or of every step so far (None)."""
        updates = self._updates
        steps = [s for s in updates if after is None or s <= after]
        if steps:
            self.stream.wait_event(updates[max(steps)])

    def write_back(
        self,
        cache: torch.Tensor,
        slots: torch.Tensor,
        host: torch.Tensor,
        rows: torch.Tensor,
        after: int | None,
    ) -> None:
        """Cache ``slots`` into host ``rows`` once step ``after`` is updated (None: every step so far);
        their data is in the host when this returns."""
        staging = self._write_backs.take(len(slots))
        with torch.cuda.stream(self.stream):
            self._begin(after)
            staging.copy_(cache.index_select(0, to_device(slots, self.device)), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()
        host.index_copy_(0, rows, staging)

    def load(
        self,
        host: torch.Tensor,
        rows: torch.Tensor,
        cache: torch.Tensor,
        slots: torch.Tensor,
        after: int | None,
    ) -> None:
        """Host ``rows`` into cache ``slots``, queued on the copy stream once step ``after`` is updated
        (None: every step so far); ``ready`` marks them done."""
        staging = self._loads.take(len(rows))
        torch.index_select(host, 0, rows, out=staging)
        with torch.cuda.stream(self.stream):
            self._begin(after)
            timing = None if self.load_timings is None else _timed(self.stream)
            on_device = staging.to(self.device, non_blocking=True)
            cache.index_copy_(0, to_device(slots, self.device), on_device)
            done = torch.cuda.Event()
            done.record(self.stream)
            if timing is not None:
                self.load_timings.append((timing, _timed(self.stream)))
        self._loads.busy = done
        self.ready = done

    def mark_ready(self) -> None:
        """``ready`` from now on: after everything queued on the copy stream so far."""
        done = torch.cuda.Event()
        done.record(self.stream)
        self.ready = done

    def wait_ready(self, event: torch.cuda.Event | None) -> None:
        """Training thread: the compute stream waits for a step's loads (the host does not)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``; on CUDA through pinned memory, so the host does not wait (a copy
    from pageable memory would first wait for the stream's earlier work)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _timed(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event
