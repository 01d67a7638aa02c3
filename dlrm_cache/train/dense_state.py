"""The dense part of a DLRM (everything but its embedding tables) as a state dict, under the unsharded
model's names: what a checkpoint holds beside the tables, whatever the model's sharding."""

from __future__ import annotations

import torch

from dlrm_cache.distributed.runtime import SPARSE_ARCH


def dense_state(model: torch.nn.Module) -> dict:
    """Everything but the embedding tables, under the unsharded model's names."""
    return {
        f"{name}.{k}": v
        for name, child in model.named_children()
        if name != SPARSE_ARCH
        for k, v in child.state_dict().items()
    }


def load_dense_state(model: torch.nn.Module, state: dict) -> None:
    for name, child in model.named_children():
        if name != SPARSE_ARCH:
            prefix = f"{name}."
            child.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
