"""Fused sparse optimizers: update only the rows a step touched, weight and state together.

A row is stored as ``[weight (D) | optimizer state (S)]``; ``state_width`` gives S. The formulas are
those of the references the tests compare against:

- ``sgd``: ``w -= lr * g`` (``torch.optim.SGD`` on ``nn.EmbeddingBag``).
- ``adagrad``: row-wise, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: ``s += mean(g^2)``,
  ``w -= lr * g / (sqrt(s) + eps)``; one state value per row.
- ``adam``: lazy, as ``torch.optim.SparseAdam``: first and second moments of the touched rows only,
  bias correction from the optimizer's global step count.

``g`` is the gradient of a whole row for the step, summed over all its occurrences in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlrm_cache.config import SPARSE_OPTIMIZERS, OptimConfig


@dataclass(frozen=True)
class SparseOptimizer:
    kind: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.kind not in SPARSE_OPTIMIZERS:
            raise ValueError(f"optim.sparse={self.kind!r}: expected one of {', '.join(SPARSE_OPTIMIZERS)}")

    @classmethod
    def from_config(cls, o: OptimConfig) -> SparseOptimizer:
        """The sparse optimizer ``optim.*`` describes."""
        return cls(o.sparse, lr=o.sparse_lr, eps=o.eps, beta1=o.beta1, beta2=o.beta2)

    def state_width(self, dim: int) -> int:
        return {"sgd": 0, "adagrad": 1, "adam": 2 * dim}[self.kind]

    @property
    def state_per_column(self) -> bool:
        """Adam's state is two blocks of one value per column, ``[m (D) | v (D)]``; Adagrad's is one
        value per row, SGD has none."""
        return self.kind == "adam"

    @torch.no_grad()
    def update(self, rows: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        """Update ``rows`` (U, D + S) in place from ``grad`` (U, D); ``step`` counts from 1."""
        dim = grad.shape[1]
        w = rows[:, :dim]
        if self.kind == "sgd":
            w.sub_(grad, alpha=self.lr)
        elif self.kind == "adagrad":
            s = rows[:, dim]
            s.add_(grad.pow(2).mean(dim=1))
            w.sub_(grad * (self.lr / (s.sqrt() + self.eps)).unsqueeze(1))
        else:
            m, v = rows[:, dim : 2 * dim], rows[:, 2 * dim :]
            m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias1, bias2 = 1 - self.beta1**step, 1 - self.beta2**step
            w.sub_(m / (v.sqrt() + self.eps), alpha=self.lr * math.sqrt(bias2) / bias1)
