"""This process's place under ``torchrun``, from its environment (no torch import: the commands that
never train read it too)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the ranks on this node (several nodes: fewer than world_size)


def current_rank() -> Rank:
    """This process's place under ``torchrun`` (its environment variables), or a single process."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Rank(
        int(env.get("RANK", "0")),
        world,
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("LOCAL_WORLD_SIZE", world)),
    )
