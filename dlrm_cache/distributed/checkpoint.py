"""Checkpoints of cached tables that load on any number of ranks.

TorchRec skips ``customized_kernel`` tables in its state handling, so the cache writes its own: every
rank saves the flushed rows of the shards it holds (weight and optimizer state, with where each shard
sits in its full table) to ``embeddings-rank<r>.pt``; a loader, whatever its own sharding, assembles
each of its shards from the pieces that overlap it (files are memory-mapped, so a rank reads only what
it needs). Written with N ranks, a checkpoint loads with M ranks, or in one unsharded process.

Optimizer state follows the weight it belongs to: Adam's moments column by column; row-wise Adagrad's
one value per row is exact for whole tables; a column shard keeps its own (as FBGEMM's row-wise
optimizers under column-wise sharding do), and a shard loaded from a different column split takes
the state of the piece holding its first column.

A checkpoint is a folder written beside the previous one and swapped in by renames, so a crash at any
point leaves a whole checkpoint (the old or the new) that ``find_checkpoint`` returns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer

FORMAT = 1
META = "meta.pt"  # written last: a folder without it is incomplete
CURRENT, NEW, OLD = "checkpoint", "checkpoint.new", "checkpoint.old"

Collections = list[tuple[CachedEmbeddingBagCollection, dict[str, TableShard]]]


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"embeddings-rank{rank}.pt"


def embedding_pieces(collections: Collections) -> list[dict]:
    """This rank's shards: rows (flushed) and where each sits in its full table."""
    pieces = []
    for ebc, shards in collections:
        state = ebc.state_dict()
        for cfg in ebc.embedding_bag_configs():
            shard = shards.get(cfg.name, TableShard.whole(cfg))
            pieces.append(
                {
                    "table": cfg.name,
                    "row_offset": shard.row_offset,
                    "col_offset": shard.col_offset,
                    "full_rows": shard.full_rows,
                    "full_dim": shard.full_dim,
                    "weight": state[f"embedding_bags.{cfg.name}.weight"],
                    "state": state[f"embedding_bags.{cfg.name}.optimizer_state"],
                    "optimizer_step": int(state["optimizer_step"]),
                }
            )
    return pieces


def save(
    run_dir: Path,
    rank: int,
    world_size: int,
    collections: Collections,
    meta: Callable[[], dict],
    barrier: Callable[[], None],
) -> Path:
    """Every rank writes its pieces into ``checkpoint.new/``; then rank 0 writes ``meta()`` (dense model,
    optimizer, step, ...) and swaps the folder in. Collective: every rank must call it."""
    new = run_dir / NEW
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
    barrier()
    torch.save(embedding_pieces(collections), _rank_file(new, rank))
    barrier()
    if rank == 0:
        torch.save({**meta(), "format": FORMAT, "world_size": world_size}, new / META)
        current, old = run_dir / CURRENT, run_dir / OLD
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.replace(current, old)
        os.replace(new, current)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return run_dir / CURRENT


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint in ``run_dir`` (after a crash mid-swap: the new folder if it was
    finished, else the old one)."""
    for name in (CURRENT, NEW, OLD):
        if (run_dir / name / META).is_file():
            return run_dir / name
    return None


def load_meta(folder: Path) -> dict:
    meta = torch.load(folder / META, weights_only=False)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    return meta


def load_embeddings(folder: Path, world_size: int, collections: Collections) -> None:
    """Fill every local shard from the pieces that overlap it, in the files of the ``world_size`` ranks
    that wrote the checkpoint (``load_meta(folder)["world_size"]``)."""
    pieces = []
    for r in range(world_size):
        path = _rank_file(folder, r)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the checkpoint was written by {world_size} ranks)")
        pieces += torch.load(path, mmap=True, weights_only=True)
    by_table: dict[str, list[dict]] = {}
    for p in pieces:
        by_table.setdefault(p["table"], []).append(p)
    for ebc, shards in collections:
        state = {}
        steps = set()
        for cfg in ebc.embedding_bag_configs():
            shard = shards.get(cfg.name, TableShard.whole(cfg))
            found = by_table.get(cfg.name)
            if not found:
                raise ValueError(f"{folder}: no rows for table {cfg.name!r}")
            weight, opt_state = _assemble(
                cfg.name, shard, cfg.num_embeddings, cfg.embedding_dim, found, ebc.optimizer
            )
            state[f"embedding_bags.{cfg.name}.weight"] = weight
            state[f"embedding_bags.{cfg.name}.optimizer_state"] = opt_state
            steps.update(p["optimizer_step"] for p in found)
        if len(steps) != 1:
            raise ValueError(f"{folder}: pieces at different optimizer steps {sorted(steps)}")
        state["optimizer_step"] = torch.tensor(steps.pop())
        ebc.load_state_dict(state)


def _assemble(
    name: str, shard: TableShard, rows: int, cols: int, pieces: list[dict], optimizer: SparseOptimizer
) -> tuple[torch.Tensor, torch.Tensor]:
    full = {(p["full_rows"], p["full_dim"]) for p in pieces}
    if full != {(shard.full_rows, shard.full_dim)}:
        raise ValueError(
            f"table {name!r}: the checkpoint has shape {full}, the model {shard.full_rows, shard.full_dim}"
        )
    state_width = optimizer.state_width(cols)
    weight = torch.empty(rows, cols)
    state = torch.zeros(rows, state_width)
    r0, c0 = shard.row_offset, shard.col_offset
    covered = 0  # cells filled (pieces of one checkpoint never overlap)
    for p in pieces:
        pr, pc = p["row_offset"], p["col_offset"]
        pw = p["weight"]
        lo_r, hi_r = max(r0, pr), min(r0 + rows, pr + pw.shape[0])
        lo_c, hi_c = max(c0, pc), min(c0 + cols, pc + pw.shape[1])
        if lo_r >= hi_r or lo_c >= hi_c:
            continue
        dst = (slice(lo_r - r0, hi_r - r0), slice(lo_c - c0, hi_c - c0))
        src = (slice(lo_r - pr, hi_r - pr), slice(lo_c - pc, hi_c - pc))
        weight[dst] = pw[src]
        covered += (hi_r - lo_r) * (hi_c - lo_c)
        if optimizer.state_per_column:
            pcols = pw.shape[1]
            for half in range(2):
                state[dst[0], half * cols + dst[1].start : half * cols + dst[1].stop] = p["state"][
                    src[0], half * pcols + src[1].start : half * pcols + src[1].stop
                ]
        elif state_width and pc <= c0 < pc + pw.shape[1]:  # the piece holding this shard's first column
            state[dst[0]] = p["state"][src[0]]
    if covered != rows * cols:
        raise ValueError(f"table {name!r}: the checkpoint does not cover rows/columns this shard holds")
    return weight, state
