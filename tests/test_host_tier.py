"""The host tier at scale: a mapped table's disk I/O per missed row, checkpoints in bounded memory,
bit-exact round trips of mapped tables over any split, and a file system without room."""

import json
import mmap
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_cache import loss_of, make_batches, make_tables, train

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig
from dlrm_cache.distributed import checkpoint as ckpt

PAGE = 4096


def mapped(tmp_path, rows, dim=16, kind="adagrad", ratio=0.01, **kw):
    cfg = CacheConfig(policy="lru", ratio=ratio, host="mmap", mmap_dir=str(tmp_path), warmup_ratio=0.5, **kw)
    return CachedEmbeddingBagCollection(make_tables(dim=dim, rows=rows), cfg, SparseOptimizer(kind, lr=0.05))


def evict_from_page_cache(ebc):
    """Make the host files' pages come from the disk again: unmapped from the process (their data
    stays in the shared file), written out, dropped from the page cache."""
    for g in ebc.groups:
        if g.host is not None and g.host.path is not None:
            g.host._map.madvise(mmap.MADV_DONTNEED)
            fd = os.open(g.host.path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def uniform_batches(steps, rows, batch_size, seed=0):
    """Near-unique ids: almost every lookup a miss."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    return [
        KeyedJaggedTensor(
            keys=[f"f{i}" for i in range(len(rows))],
            values=torch.cat([torch.randint(0, n, (batch_size,), generator=g) for n in rows]),
            lengths=torch.ones(len(rows) * batch_size, dtype=torch.int64),
        )
        for _ in range(steps)
    ]


def test_a_missed_row_reads_about_a_page_and_the_counters_follow_the_misses(tmp_path):
    rows = [400_000]  # 64 + 1 floats a row: a 104 MB file, far more pages than a batch touches
    ebc = mapped(tmp_path, rows, dim=64, ratio=0.002)
    evict_from_page_cache(ebc)
    batches = uniform_batches(12, rows, batch_size=512)
    train(ebc, batches[:4])
    first = ebc.stats()
    assert first["rows_loaded"] > 1000 and first["disk_read_bytes"] > 0
    # one page per missed row, two where a row straddles pages; the kernel's readahead would be ~30x
    assert first["disk_read_bytes_per_row_loaded"] <= 2 * PAGE
    train(ebc, batches[4:])
    later = ebc.stats()
    grown_rows = later["rows_loaded"] - first["rows_loaded"]
    grown_bytes = later["disk_read_bytes"] - first["disk_read_bytes"]
    assert grown_rows > 2000 and PAGE / 2 * grown_rows <= grown_bytes <= 2 * PAGE * grown_rows
    assert later["rows_written"] > 0 and later["disk_write_bytes"] > 0  # dirty victims went back
    # a row written back dirties its page or two, not a large folio of the page cache around it
    assert later["disk_write_bytes_per_row_written"] <= 2 * PAGE
    # and so after a checkpoint was written from the table and loaded back into it
    (folder := tmp_path / "ckpt").mkdir()
    ckpt.write_embeddings(folder, 0, [(ebc, {})])
    ckpt.load_embeddings(folder, 1, [(ebc, {})])
    train(ebc, uniform_batches(8, rows, batch_size=512, seed=1))
    end = ebc.stats()
    written = end["disk_write_bytes"] - later["disk_write_bytes"]
    assert 0 < written <= 2 * PAGE * (end["rows_written"] - later["rows_written"])
    memory = CachedEmbeddingBagCollection(
        make_tables(dim=64, rows=rows), CacheConfig(policy="lru", ratio=0.002), SparseOptimizer("adagrad")
    )
    train(memory, batches[:2])
    assert memory.stats()["disk_read_bytes"] == 0  # a host tier in RAM does no disk I/O
    ebc.close()


def rows_of(ebc):
    ebc.flush()
    return torch.cat([g.table_rows(t).clone() for g in ebc.groups for t in range(len(g.configs))])


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_mapped_tables_round_trip_bit_exact_over_any_split_and_train_on_identically(tmp_path, kind):
    rows = [40, 3000, 600]
    batches = make_batches(30, batch_size=32, rows=rows)
    trained = mapped(tmp_path / "a", rows, dim=8, kind=kind, ratio=0.05, full_table_rows=50)
    train(trained, batches[:15], lookahead=2)
    expected = rows_of(trained)
    (one := tmp_path / "one").mkdir()
    ckpt.write_embeddings(one, 0, [(trained, {})])
    # one rank -> two column halves (mapped) -> two ranks' files -> one whole table in RAM
    halves = []
    for c in (0, 4):
        tables = make_tables(dim=4, rows=rows)
        shards = {t.name: TableShard(0, c, t.num_embeddings, 8) for t in tables}
        cfg = CacheConfig(
            policy="lru", ratio=0.05, full_table_rows=50, host="mmap", mmap_dir=str(tmp_path / f"h{c}")
        )
        halves.append((CachedEmbeddingBagCollection(tables, cfg, trained.optimizer, shards=shards), shards))
    ckpt.load_embeddings(one, 1, halves)
    (two := tmp_path / "two").mkdir()
    for rank, half in enumerate(halves):
        ckpt.write_embeddings(two, rank, [half])
    restored = CachedEmbeddingBagCollection(
        make_tables(dim=8, rows=rows), CacheConfig(policy="lookahead", ratio=0.05, full_table_rows=50),
        trained.optimizer,
    )  # fmt: skip
    ckpt.load_embeddings(two, 2, [(restored, {})])
    weights = expected[:, :8]
    assert torch.equal(rows_of(restored)[:, :8], weights)
    if kind == "adam":  # per-column state follows its columns exactly
        assert torch.equal(rows_of(restored), expected)
    assert restored.optimizer_step == trained.optimizer_step == 15
    # and a mapped table loaded back from one rank trains on exactly as the original does
    again = mapped(tmp_path / "b", rows, dim=8, kind=kind, ratio=0.05, full_table_rows=50)
    ckpt.load_embeddings(one, 1, [(again, {})])
    assert torch.equal(rows_of(again), expected)
    for a, b in zip(train(trained, batches[15:]), train(again, batches[15:]), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rows_of(again), rows_of(trained))
    for ebc in (trained, again, *(h for h, _ in halves)):
        ebc.close()


CHILD = textwrap.dedent(
    """
    import json, re, sys, torch
    from pathlib import Path
    from test_cache import make_tables, train, make_batches
    from dlrm_cache.cache import host
    from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
    from dlrm_cache.cache.optim import SparseOptimizer
    from dlrm_cache.config import CacheConfig
    from dlrm_cache.distributed import checkpoint as ckpt

    def peak_above_now(work):
        '''The peak resident memory (kB) that ``work`` adds to what the process holds now.'''
        status = lambda key: int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current size
        before = status("VmRSS")
        work()
        return status("VmHWM") - before

    kind, folder = sys.argv[1], Path(sys.argv[2])
    host.CHUNK_BYTES = 4 << 20
    rows = [1_000_000]  # 63 + 1 floats a row: a 256 MB table, 64 chunks
    def model():
        cfg = CacheConfig(policy="lru", ratio=0.001, host=kind, mmap_dir=str(folder / "host"))
        return CachedEmbeddingBagCollection(make_tables(dim=63, rows=rows), cfg, SparseOptimizer("adagrad"))
    ebc = model()
    train(ebc, make_batches(3, batch_size=64, rows=rows))
    (folder / "ckpt").mkdir()
    save = peak_above_now(lambda: ckpt.write_embeddings(folder / "ckpt", 0, [(ebc, {})]))
    ebc.close()
    del ebc
    fresh = model()
    load = peak_above_now(lambda: ckpt.load_embeddings(folder / "ckpt", 1, [(fresh, {})]))
    print(json.dumps({"save_kb": save, "load_kb": load}))
    """
)


@pytest.mark.parametrize("kind", ["memory", "mmap"])
def test_saving_and_loading_a_table_far_larger_than_a_chunk_keeps_memory_bounded(tmp_path, kind):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.splitlines()[-1])
    # the table is 256 MB; cloning it (as a state_dict does) would add all of it
    assert peaks["save_kb"] < 40_000, peaks
    assert peaks["load_kb"] < 40_000, peaks
    assert (tmp_path / "ckpt" / "rank0.t0.f32").stat().st_size == 1_000_000 * 64 * 4


@pytest.fixture
def small_fs(mounted):
    """A 4 MB tmpfs, where this machine lets the test mount one."""
    return mounted("small", "size=4m")


def test_a_file_system_without_room_for_the_host_table_is_refused_at_start(small_fs):
    with pytest.raises(
        OSError, match=r"cache.mmap_dir=.*small: the host table needs 0.01 GB, .* 0.00 GB free"
    ):
        mapped(small_fs, [200_000], dim=16)  # 13.6 MB
    assert not list(small_fs.iterdir()), "nothing left behind"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_whole(small_fs):
    rows = [20_000]  # 20,000 x 17 floats: 1.36 MB a checkpoint on a 4 MB file system
    ebc = CachedEmbeddingBagCollection(
        make_tables(dim=16, rows=rows), CacheConfig(policy="lru", ratio=0.05), SparseOptimizer("adagrad")
    )
    batches = make_batches(4, batch_size=32, rows=rows)

    def save():
        ckpt.save(small_fs, 0, 1, [(ebc, {})], lambda: {"step": ebc.optimizer_step}, lambda ok: ok)

    train(ebc, batches[:2])
    save()
    first = rows_of(ebc)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 2_000_000)  # leaves less than a checkpoint's room
    train(ebc, batches[2:])
    with pytest.raises(
        OSError,
        match=r"not written \(.*No space left on device\); the previous one, .*checkpoint, is intact",
    ):
        save()
    assert sorted(p.name for p in small_fs.iterdir()) == ["checkpoint", "filler"]  # the new one removed
    found = ckpt.find_checkpoint(small_fs)
    assert found == small_fs / "checkpoint" and ckpt.load_meta(found)["step"] == 2
    back = CachedEmbeddingBagCollection(
        make_tables(dim=16, rows=rows), CacheConfig(policy="none"), SparseOptimizer("adagrad")
    )
    ckpt.load_embeddings(found, 1, [(back, {})])
    assert torch.equal(rows_of(back), first)
    loss_of(back(batches[0]).values()).backward()  # and it trains
