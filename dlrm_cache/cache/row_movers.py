"""How a group's rows move between the host tier and the device cache, chosen once per group:

- ``NativeRows``: both tiers in host memory (the CPU device) with the C++ planner: one ``memcpy`` per
  row (``native.RowKernels``); the planner copies a plan's loads and write-backs itself.
- ``CudaRows``: a CUDA device: loads and write-backs through pinned staging on a copy stream
  (``transfer.DeviceTransfers``), gathers and update write-backs by torch on the compute stream.
- ``TorchRows``: anywhere else, torch's indexed copies.

Each moves four ways: a plan's loads (``copy_in``) and evictions (``copy_out``), a step's gather of
its unique rows (hits from the cache, overflow rows from the host) and the write-back of its updated
rows (into their slots, marked dirty, or into the host where they were served from it). Without
native copies the updated rows go back in one indexed copy that sends the overflow rows into a
scratch row after the cache's slots (``scratch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dlrm_cache.cache.host_served import HostWrites
from dlrm_cache.cache.native import RowKernels
from dlrm_cache.cache.transfer import DeviceTransfers
from dlrm_cache.reused_buffers import ReusedBuffers

if TYPE_CHECKING:
    from dlrm_cache.cache.group import StepPlan
    from dlrm_cache.cache.slots import SlotState


class TorchRows:
    planner_copies = False  # the planner lists the rows to copy; this mover copies them
    scratch = True  # updated rows go back through the scratch row after the cache's slots
    reads_host_at_plan = True  # host-served rows read when planned, written back lazily (``host_served``)

    def __init__(self, device: torch.device):
        self.device = device
        self.writes = HostWrites()

    def copy_in(self, host: Tensor, rows: Tensor, cache: Tensor, slots: Tensor, after: int | None) -> None:
        """Host ``rows`` into cache ``slots`` (the data only), once step ``after`` is updated (None: every
        step so far): the update of the last step that may have used the slots."""
        cache.index_copy_(0, slots.to(self.device), host.index_select(0, rows).to(self.device))

    def copy_out(self, cache: Tensor, slots: Tensor, host: Tensor, rows: Tensor, after: int | None) -> None:
        """Cache ``slots`` back into host ``rows`` (the data only), once step ``after`` is updated."""
        host.index_copy_(0, rows, cache.index_select(0, slots.to(self.device)).cpu())

    def gather(self, plan: StepPlan, cache: torch.Tensor, host: torch.Tensor | None) -> torch.Tensor:
        """The step's unique rows (U, width) on the device; host-served rows as the plan read them
        (``host_served.HostServed``), or from the previous step's update."""
        slots = plan.on_device("slots", plan.slots, self.device)
        if plan.overflow is None:
            return cache.index_select(0, slots)
        # Every position reads a slot (host-served ones slot 0), then the host-served rows replace those.
        rows = cache.index_select(0, slots.clamp(min=0))
        served = plan.host_served
        on = {k: plan.on_device(k, t, self.device) for k, t in served.index_tensors().items()}
        rows.index_copy_(0, on["read_at"], on["values"])
        if len(served.updated_at):
            updated = self.writes.updated_by(served.after_step)
            rows.index_copy_(0, on["updated_at"], updated.index_select(0, on["update_index"]))
        return rows

    def write_back(self, plan: StepPlan, rows: torch.Tensor, cache: torch.Tensor,
                   cache_and_scratch: torch.Tensor | None, state: SlotState | None,
                   host: torch.Tensor | None) -> None:  # fmt: skip
        """The step's updated ``rows`` into their slots of ``cache`` (marked dirty in ``state``; None: a
        resident table), or into ``host`` where served from it (``cache_and_scratch``: the cache and
        its scratch row after it)."""
        if plan.overflow is None:
            cache.index_copy_(0, plan.on_device("slots", plan.slots, self.device), rows)
            if state is not None:
                state.dirty[plan.slots] = True
            return
        cache_and_scratch.index_copy_(0, plan.on_device("write_slots", plan.write_slots, self.device), rows)
        state.dirty_and_scratch[plan.write_slots] = True
        updated = rows.index_select(0, plan.on_device("overflow", plan.overflow, self.device))
        self.writes.queue(plan.step, plan.host_rows, updated, self.to_host)

    def to_host(self, t: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        """``t`` on its way into host memory, and what marks it there (None: it is)."""
        return t.to("cpu"), None

    def settle(self, host: Tensor, before: int | None = None) -> None:
        """The host-served rows updated by the steps before ``before`` (None: all) written into ``host``."""
        self.writes.settle(host, before)

    def ready(self) -> torch.cuda.Event | None:
        """An event after the loads queued so far (None: they are done when queued)."""
        return None

    def wait(self, event: torch.cuda.Event | None) -> None:
        """The compute stream waits for ``event`` (copies on a stream of their own)."""

    def after_update(self, step: int) -> None:
        """After step ``step``'s update is queued: the copies that need it wait for it."""

    def adopt(self, cache: Tensor) -> None:
        """The group's cache tensor, just made (and filled) on the compute stream."""

    def stage(self, plan: StepPlan) -> None:
        """Bookkeeping thread, once a step is planned: its index tensors on their way to the device
        (CUDA; elsewhere they are where they are used)."""

    def record_load_timings(self) -> list | None:
        """CUDA: from now on, the (start, end) timing events of every load's copies (for benchmarks);
        None elsewhere."""
        return None


class CudaRows(TorchRows):
    def __init__(self, device: torch.device, width: int):
        super().__init__(device)
        self.transfers = DeviceTransfers(device, width)

    def copy_in(self, host: Tensor, rows: Tensor, cache: Tensor, slots: Tensor, after: int | None) -> None:
        self.transfers.load(host, rows, cache, slots, after)

    def copy_out(self, cache: Tensor, slots: Tensor, host: Tensor, rows: Tensor, after: int | None) -> None:
        self.transfers.write_back(cache, slots, host, rows, after)

    def ready(self) -> torch.cuda.Event | None:
        return self.transfers.ready

    def wait(self, event: torch.cuda.Event | None) -> None:
        self.transfers.wait_ready(event)

    def after_update(self, step: int) -> None:
        self.transfers.after_update(step)

    def adopt(self, cache: Tensor) -> None:
        """The copy stream waits for the cache's allocation and fill (warm-up loads must not race the
        zeros), and the allocator keeps its memory until the copies queued on the stream are done."""
        self.transfers.stream.wait_stream(torch.cuda.current_stream(self.device))
        cache.record_stream(self.transfers.stream)

    def stage(self, plan: StepPlan) -> None:
        """The step's index tensors pinned and copied on the copy stream, after its loads (the step's
        ``ready`` event covers them): the training thread copies none from pageable memory mid-step."""
        b = plan.batch
        tensors = {"slots": plan.slots, "inverse": b.inverse, "offsets": b.offsets, "overflow": plan.overflow,
                   "write_slots": plan.write_slots}  # fmt: skip
        if plan.host_served is not None:
            tensors.update(plan.host_served.index_tensors())
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.transfers.stream):
            for name, t in tensors.items():
                if t is not None:
                    on_device = t.pin_memory().to(self.device, non_blocking=True)
                    on_device.record_stream(compute)  # used there: not reused before it is done
                    plan.device_tensors[name] = on_device
            self.transfers.mark_ready()

    def record_load_timings(self) -> list | None:
        self.transfers.load_timings = []
        return self.transfers.load_timings

    def to_host(self, t: Tensor) -> tuple[Tensor, torch.cuda.Event]:
        """A non-blocking copy into pinned memory on the compute stream: the training thread does not wait."""
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return pinned, done


class NativeRows(TorchRows):
    planner_copies = True
    scratch = False
    reads_host_at_plan = False  # gathers and scatters host-served rows in place, on the CPU

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.kernels = RowKernels()
        self._rows = ReusedBuffers(torch.float32)  # a step's rows: fresh memory would fault every page

    def copy_in(self, host: Tensor, rows: Tensor, cache: Tensor, slots: Tensor, after: int | None) -> None:
        self.kernels.copy(host, rows, cache, slots)

    def copy_out(self, cache: Tensor, slots: Tensor, host: Tensor, rows: Tensor, after: int | None) -> None:
        self.kernels.copy(cache, slots, host, rows)

    def gather(self, plan: StepPlan, cache: torch.Tensor, host: torch.Tensor | None) -> torch.Tensor:
        out = self._rows.take(len(plan.slots) * cache.shape[1]).view(len(plan.slots), cache.shape[1])
        return self.kernels.gather(
            cache, plan.slots, None if plan.overflow is None else host, plan.batch.uniq, out
        )

    def write_back(self, plan: StepPlan, rows: torch.Tensor, cache: torch.Tensor,
                   cache_and_scratch: torch.Tensor | None, state: SlotState | None,
                   host: torch.Tensor | None) -> None:  # fmt: skip
        host = None if plan.overflow is None else host
        dirty = None if state is None else state.dirty
        self.kernels.scatter(rows, plan.slots, plan.batch.uniq, cache, dirty, host)


def row_mover(
    device: torch.device, width: int, native: bool | None, planner: str, resident: bool
) -> TorchRows:
    """The group's mover: ``native`` True / False / None (wherever it can: the C++ planner on the
    CPU device); a ``resident`` group (every row on the device) copies nothing between tiers."""
    can_copy_natively = planner == "native" and device.type == "cpu"
    if native and not can_copy_natively:
        raise ValueError(
            f"cache.row_copies=native needs the native planner on the CPU device "
            f"(planner {planner}, device {device.type}): use row_copies=torch or auto"
        )
    if can_copy_natively if native is None else native:
        return NativeRows()
    return CudaRows(device, width) if device.type == "cuda" and not resident else TorchRows(device)
