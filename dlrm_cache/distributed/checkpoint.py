"""Checkpoints of cached tables that load on any number of ranks, in bounded memory.

TorchRec skips ``customized_kernel`` tables in its state handling, so the cache writes its own: every
rank streams the flushed rows of the shards it holds (weight and optimizer state, the host layout) into
one raw float32 file per shard, ``rank<r>.<table>.f32``, and lists them, with where each shard sits in
its full table, in ``embeddings-rank<r>.json``. A loader, whatever its own sharding, assembles each of
its shards a chunk of rows at a time from the pieces that overlap it. Neither side ever holds a whole
table: a mapped host table is copied file to file by the kernel, memory ones a chunk at a time. Written
with N ranks, a checkpoint loads with M ranks, or in one unsharded process.

Optimizer state follows the weight it belongs to: Adam's moments column by column; row-wise Adagrad's
one value per row is exact for whole tables; a column shard keeps its own (as FBGEMM's row-wise
optimizers under column-wise sharding do), and a shard loaded from a different column split takes
the state of the piece holding its first column.

A checkpoint is a folder written beside the previous one and swapped in by renames; each file in it
is written under a temporary name, synced and renamed, and ``meta.pt`` comes last. So a crash at any
point, or a full disk, leaves a whole checkpoint (the old or the new) that ``find_checkpoint`` returns.
Each piece's CRC-32 is in its rank's index; a piece whose bytes changed on disk since is refused
wherever it is read (resume, predict, export), naming the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dlrm_cache.cache import host as host_tier
from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.group import TableGroup
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.files import atomic_file, file_crc32, swap_in

FORMAT = 2
READS = (1, 2)  # format 1: every rank's pieces as tensors in one embeddings-rank<r>.pt
META = "meta.pt"  # written last: a folder without it is incomplete
CURRENT, NEW, OLD = "checkpoint", "checkpoint.new", "checkpoint.old"

# A cache collection, or anything with its checkpoint interface (``hot_rows.HotRows``), and where
# each of its tables sits in the full table (absent: the whole table).
Collections = list[tuple[CachedEmbeddingBagCollection, dict[str, TableShard]]]


def _index_file(folder: Path, rank: int) -> Path:
    return folder / f"embeddings-rank{rank}.json"


def write_embeddings(folder: Path, rank: int, collections: Collections) -> None:
    """This rank's shards, flushed, into ``folder``: a raw file of rows per shard, then their index."""
    pieces = []
    if rank != 0:  # replicated rows (the hybrid sharding's hot rows) are written once, by rank 0
        collections = [(ebc, shards) for ebc, shards in collections if not getattr(ebc, "replicated", False)]
    with _progress("checkpoint: saving", collections) as bar:
        for ebc, shards in collections:
            ebc.flush()
            for g in ebc.groups:
                for t, cfg in enumerate(g.configs):
                    shard = shards.get(cfg.name, TableShard.whole(cfg))
                    # a table's hot and cold rows (hybrid) are two pieces on rank 0
                    at = f"@{shard.row_offset}" if shard.row_offset else ""
                    name = f"rank{rank}.{cfg.name}{at}.f32"
                    with atomic_file(folder / name) as f:
                        g.save_table(t, f)
                    crc = file_crc32(folder / name)  # what was written, checked where it is read
                    bar.update(g.layout.rows[t] * g.width * 4)
                    pieces.append(
                        {
                            "table": cfg.name,
                            "file": name,
                            "rows": g.layout.rows[t],
                            "cols": g.dim,
                            "width": g.width,
                            "row_offset": shard.row_offset,
                            "col_offset": shard.col_offset,
                            "full_rows": shard.full_rows,
                            "full_dim": shard.full_dim,
                            "optimizer_step": ebc.optimizer_step,
                            "crc32": crc,
                        }  # fmt: skip
                    )
    with atomic_file(_index_file(folder, rank)) as f:
        f.write(json.dumps({"format": FORMAT, "pieces": pieces}, indent=1).encode())


def save(
    run_dir: Path,
    rank: int,
    world_size: int,
    collections: Collections,
    meta: Callable[[], dict],
    agree: Callable[[bool], bool],
) -> Path:
    """Every rank writes its pieces into ``checkpoint.new/``; then rank 0 writes ``meta()`` (dense model,
    optimizer, step, ...) and swaps the folder in. Collective: every rank must call it, and ``agree(ok)``
    must return whether every rank's ``ok`` was true. After each phase the ranks agree: a failure on
    any rank (a full disk, an unreadable row) removes what this checkpoint wrote and is raised on every
    rank at once (the failing rank's own error; on the others an ``OSError`` saying another rank
    failed): the previous checkpoint stays as it was, and no rank waits for one that gave up."""
    new = run_dir / NEW

    def fresh_folder() -> None:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)

    def write_meta() -> None:
        missing = [r for r in range(world_size) if not _index_file(new, r).is_file()]
        if missing:
            raise FileNotFoundError(2, f"ranks {missing} wrote no pieces", str(new))
        with atomic_file(new / META) as f:  # on the host, whatever device each tensor came from
            torch.save(_to_host({**meta(), "format": FORMAT, "world_size": world_size}), f)
        swap_in(new, run_dir / CURRENT, aside=run_dir / OLD)

    for phase, everyone in ((fresh_folder, False), (lambda: write_embeddings(new, rank, collections), True),
                            (write_meta, False)):  # fmt: skip
        error = None
        if everyone or rank == 0:
            try:
                phase()
            except Exception as e:  # agreed on below, then raised
                error = e
        if not agree(error is None):
            _give_up(run_dir, rank, error)
    return run_dir / CURRENT


def _to_host(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_host(v) for v in value)
    return value


def _give_up(run_dir: Path, rank: int, error: Exception | None) -> None:
    """Remove what this rank wrote of the checkpoint and raise, saying what is kept: ``error`` (this
    rank's own, an ``OSError`` made one line) or, where another rank failed, an ``OSError`` saying so."""
    new = run_dir / NEW
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
    else:
        for f in new.glob(f"rank{rank}.*"):
            f.unlink(missing_ok=True)
    previous = find_checkpoint(run_dir)
    kept = f"the previous one, {previous}, is intact" if previous else "there is no earlier one"
    if error is None:
        raise OSError(f"checkpoint not written (another rank could not write its part); {kept}")
    if not isinstance(error, OSError):
        raise error
    where = f"{error.filename}: " if error.filename else ""
    message = f"checkpoint not written ({where}{error.strerror or error}); {kept}"
    raise OSError(error.errno, message) from error


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint in ``run_dir`` (after a crash mid-swap: the new folder if it was
    finished, else the old one)."""
    for name in (CURRENT, NEW, OLD):
        if (run_dir / name / META).is_file():
            return run_dir / name
    return None


def load_meta(folder: Path) -> dict:
    try:
        meta = torch.load(folder / META, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{folder / META}: not a readable checkpoint ({e})") from None
    if meta.get("format") not in READS:
        raise ValueError(f"{folder}: checkpoint format {meta.get('format')!r}, this version reads {READS}")
    return meta


@dataclass
class Piece:
    """One rank's shard of a table in a checkpoint: where it sits, and its rows ``[weight | state]``."""

    table: str
    rows: int
    cols: int
    row_offset: int
    col_offset: int
    full_rows: int
    full_dim: int
    optimizer_step: int
    read: Callable[[int, int], torch.Tensor]  # rows [lo, hi) of the piece, (hi - lo, width)


def pieces(folder: Path, world_size: int) -> list[Piece]:
    """The pieces of a checkpoint's tables in the files of its ``world_size`` ranks (none is read yet)."""
    found = []
    for r in range(world_size):
        index = _index_file(folder, r)
        if index.is_file():
            found += _raw_pieces(folder, index)
            continue
        legacy = folder / f"embeddings-rank{r}.pt"
        if not legacy.is_file():
            raise FileNotFoundError(f"{index}: missing (the checkpoint was written by {world_size} ranks)")
        found += [
            _tensor_piece(p) for p in torch.load(legacy, map_location="cpu", mmap=True, weights_only=True)
        ]
    return found


def _raw_pieces(folder: Path, index: Path) -> list[Piece]:
    try:
        listed = json.loads(index.read_text())["pieces"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not a checkpoint index ({e})") from None
    pieces = []
    for p in listed:
        path, row_bytes = folder / p["file"], p["width"] * 4
        size = path.stat().st_size if path.is_file() else None
        if size != p["rows"] * row_bytes:
            raise ValueError(f"{path}: {size} bytes, the index says {p['rows']} rows of {row_bytes} bytes")
        unchecked = {path: p.get("crc32")}  # checked at the first read (written before: no checksum)

        def read(lo: int, hi: int, path=path, row_bytes=row_bytes, width=p["width"], unchecked=unchecked):
            crc = unchecked.pop(path, None)
            if crc is not None and file_crc32(path) != crc:
                raise ValueError(
                    f"{path}: damaged (its bytes do not match the checksum the checkpoint wrote)"
                )
            with open(path, "rb") as f:
                f.seek(lo * row_bytes)
                data = bytearray(f.read((hi - lo) * row_bytes))
            return torch.frombuffer(data, dtype=torch.float32).view(hi - lo, width)

        fields = {k: p[k] for k in ("table", "rows", "cols", "row_offset", "col_offset", "full_rows",
                                    "full_dim", "optimizer_step")}  # fmt: skip
        pieces.append(Piece(**fields, read=read))
    return pieces


def _tensor_piece(p: dict) -> Piece:
    weight, state = p["weight"], p["state"]

    def read(lo: int, hi: int) -> torch.Tensor:
        return torch.cat([weight[lo:hi], state[lo:hi]], dim=1)

    return Piece(p["table"], weight.shape[0], weight.shape[1], p["row_offset"], p["col_offset"],
                  p["full_rows"], p["full_dim"], p["optimizer_step"], read)  # fmt: skip


def full_weights(folder: Path, world_size: int) -> dict[str, torch.Tensor]:
    """Every table's weight, whole (``full_rows x full_dim`` float32, no optimizer state), assembled
    from the pieces of the ``world_size`` ranks that wrote the checkpoint, a chunk of rows at a time:
    what a plain ``EmbeddingBagCollection`` holds. Raises ``ValueError`` if a table is not covered."""
    found = pieces(folder, world_size)
    weights: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    total = sum(p.rows * p.cols * 4 for p in found)
    with tqdm(total=total, desc="checkpoint: reading", unit="B", unit_scale=True,
              disable=total < host_tier.PROGRESS_BYTES) as bar:  # fmt: skip
        for p in found:
            w = weights.get(p.table)
            if w is None:
                w = weights[p.table] = torch.empty(p.full_rows, p.full_dim)
            elif tuple(w.shape) != (p.full_rows, p.full_dim):
                raise ValueError(f"{folder}: table {p.table!r} has pieces of shapes {tuple(w.shape)} and "
                                 f"{(p.full_rows, p.full_dim)}")  # fmt: skip
            # a piece's rows are its weight and optimizer state: at most 3 x cols floats (Adam)
            chunk = max(1, host_tier.CHUNK_BYTES // (p.cols * 4 * 3))
            for lo in range(0, p.rows, chunk):
                hi = min(p.rows, lo + chunk)
                rows = slice(p.row_offset + lo, p.row_offset + hi)
                w[rows, p.col_offset : p.col_offset + p.cols] = p.read(lo, hi)[:, : p.cols]
                bar.update((hi - lo) * p.cols * 4)
            covered[p.table] = covered.get(p.table, 0) + p.rows * p.cols
    for name, w in weights.items():
        if covered[name] != w.numel():
            raise ValueError(f"{folder}: the pieces of table {name!r} do not cover all its rows and columns")
    return weights


def load_embeddings(folder: Path, world_size: int, collections: Collections) -> None:
    """Fill every local shard from the pieces that overlap it, in the files of the ``world_size`` ranks
    that wrote the checkpoint (``load_meta(folder)["world_size"]``), a chunk of rows at a time."""
    by_table: dict[str, list[Piece]] = {}
    for p in pieces(folder, world_size):
        by_table.setdefault(p.table, []).append(p)
    with _progress("checkpoint: loading", collections) as bar:
        for ebc, shards in collections:
            if not ebc.groups:  # no rows (a hybrid split with nothing hot)
                continue
            steps = set()
            for g in ebc.groups:
                for t, cfg in enumerate(g.configs):
                    found = by_table.get(cfg.name)
                    if not found:
                        raise ValueError(f"{folder}: no rows for table {cfg.name!r}")
                    _fill(g, t, shards.get(cfg.name, TableShard.whole(cfg)), found, ebc.optimizer)
                    steps.update(p.optimizer_step for p in found)
                    bar.update(g.layout.rows[t] * g.width * 4)
            if len(steps) != 1:
                raise ValueError(f"{folder}: pieces at different optimizer steps {sorted(steps)}")
            ebc.restored(steps.pop())


def _progress(what: str, collections: Collections) -> tqdm:
    """A bar in bytes over this rank's tables, shown when they hold ``host_tier.PROGRESS_BYTES`` or more."""
    total = sum(r * g.width * 4 for ebc, _ in collections for g in ebc.groups for r in g.layout.rows)
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=total < host_tier.PROGRESS_BYTES)


def _fill(g: TableGroup, t: int, shard: TableShard, pieces: list[Piece], optimizer: SparseOptimizer) -> None:
    """Table ``t`` of ``g`` (the shard ``shard`` of its full table) from ``pieces``, chunk by chunk."""
    name, rows, cols = g.configs[t].name, g.layout.rows[t], g.dim
    full = {(p.full_rows, p.full_dim) for p in pieces}
    if full != {(shard.full_rows, shard.full_dim)}:
        raise ValueError(
            f"table {name!r}: the checkpoint has shape {full}, the model {shard.full_rows, shard.full_dim}"
        )
    covered = 0  # cells filled (pieces of one checkpoint never overlap)
    chunk_rows = max(1, host_tier.CHUNK_BYTES // (g.width * 4))
    r0, c0 = shard.row_offset, shard.col_offset
    for first in range(0, rows, chunk_rows):
        last = min(rows, first + chunk_rows)
        block = torch.zeros(last - first, g.width)
        for p in pieces:
            covered += _copy_overlap(p, block, r0 + first, r0 + last, c0, cols, optimizer)
        g.write_table_rows(t, first, block)
    if covered != rows * cols:
        raise ValueError(f"table {name!r}: the checkpoint does not cover rows/columns this shard holds")


def _copy_overlap(
    p: Piece, block: torch.Tensor, lo: int, hi: int, c0: int, cols: int, optimizer: SparseOptimizer
) -> int:
    """Copy into ``block`` (full-table rows ``[lo, hi)``, columns ``[c0, c0 + cols)``, then their state)
    what piece ``p`` holds of it; returns the weight cells copied."""
    lo_r, hi_r = max(lo, p.row_offset), min(hi, p.row_offset + p.rows)
    lo_c, hi_c = max(c0, p.col_offset), min(c0 + cols, p.col_offset + p.cols)
    if lo_r >= hi_r or lo_c >= hi_c:
        return 0
    src = p.read(lo_r - p.row_offset, hi_r - p.row_offset)
    dst_rows = slice(lo_r - lo, hi_r - lo)
    a, b = lo_c - c0, hi_c - c0  # destination columns
    pa, pb = lo_c - p.col_offset, hi_c - p.col_offset  # source columns
    block[dst_rows, a:b] = src[:, pa:pb]
    if optimizer.state_per_column:
        for half in range(2):
            block[dst_rows, cols * (1 + half) + a : cols * (1 + half) + b] = src[
                :, p.cols * (1 + half) + pa : p.cols * (1 + half) + pb
            ]
    elif optimizer.state_width(cols) and p.col_offset <= c0 < p.col_offset + p.cols:
        block[dst_rows, cols:] = src[:, p.cols :]  # the piece holding this shard's first column
    return (hi_r - lo_r) * (hi_c - lo_c)
