"""The bytes the collectives of a training step send, counted as they are issued.

TorchRec's input and output distribution call ``torch.distributed.all_to_all_single``; the hot rows'
gradient synchronisation calls ``torch.distributed.all_reduce``; DDP reduces the dense gradients in
C++ buckets, seen through a communication hook. ``CommCounter`` wraps the first two (module
attributes, looked up at each call) while it is ``counting`` and hooks the third, so that what is
counted is what was really handed to the backend, not a formula.

- An all-to-all sends each other rank its slice: the bytes of every slice but this rank's own.
- An all-reduce is counted as a ring all-reduce sends it, ``2 (W - 1) / W`` of the tensor per rank (the
  algorithm NCCL runs on large messages; gloo does not say which one it ran).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

KINDS = ("all_to_all", "all_reduce", "dense_all_reduce")
_ALL_TO_ALL, _ALL_REDUCE = dist.all_to_all_single, dist.all_reduce  # torch's own, never the wrappers


def all_to_all_bytes(tensor: torch.Tensor, input_split_sizes, rank: int, world_size: int) -> int:
    """What ``all_to_all_single(input=tensor, input_split_sizes=...)`` sends to the other ranks."""
    rows = tensor.shape[0]
    row_bytes = tensor.element_size() * (tensor.numel() // rows if rows else 0)
    own = rows // world_size if input_split_sizes is None else int(list(input_split_sizes)[rank])
    return (rows - own) * row_bytes


def ring_all_reduce_bytes(numel: int, element_size: int, world_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements."""
    return 2 * (world_size - 1) / world_size * numel * element_size


class CommCounter:
    """Counts this rank's collective bytes while ``counting`` is set (training steps, not evaluation)."""

    def __init__(self):
        self.bytes = dict.fromkeys(KINDS, 0.0)
        self.counting = False
        self._originals: dict = {}

    def install(self) -> None:
        """Wrap ``all_to_all_single`` and ``all_reduce`` (until ``uninstall``)."""
        if self._originals:
            return
        self._originals = {"all_to_all_single": dist.all_to_all_single, "all_reduce": dist.all_reduce}
        a2a, reduce = _ALL_TO_ALL, _ALL_REDUCE

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                              async_op=False):  # fmt: skip
            if self.counting:
                self.bytes["all_to_all"] += all_to_all_bytes(
                    input, input_split_sizes, dist.get_rank(group), dist.get_world_size(group)
                )
            return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if self.counting:
                w = dist.get_world_size(group)
                self.bytes["all_reduce"] += ring_all_reduce_bytes(tensor.numel(), tensor.element_size(), w)
            return reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_to_all_single = all_to_all_single
        dist.all_reduce = all_reduce

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals = {}

    def hook_ddp(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Count DDP's gradient buckets (then all-reduce them as DDP would: the mean over ranks)."""

        def hook(_, bucket):
            buffer = bucket.buffer()
            if self.counting:
                w = dist.get_world_size()
                self.bytes["dense_all_reduce"] += ring_all_reduce_bytes(
                    buffer.numel(), buffer.element_size(), w
                )
            work = _ALL_REDUCE(buffer.div_(dist.get_world_size()), async_op=True)
            return work.get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)

    @contextmanager
    def step(self):
        """Count what is issued inside (a training step's forward and backward)."""
        self.counting = True
        try:
            yield
        finally:
            self.counting = False

    def totals(self) -> dict[str, float]:
        """Every rank's counts summed (a collective: every rank calls it; not counted)."""
        counting, self.counting = self.counting, False
        mine = [self.bytes[k] for k in KINDS]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.counting = counting
        return {k: float(sum(g[i] for g in gathered)) for i, k in enumerate(KINDS)}
