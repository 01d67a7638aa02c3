"""A feature's vocabulary ranked on disk (SpilledVocabulary) against the same counts ranked in memory
(Vocabulary.fit): the same ids, the same lookup, the same file bytes, in a fraction of the memory."""

import subprocess
import sys

import numpy as np
import pytest

from dlrm_cache.data.saved_vocab import write_vocabulary
from dlrm_cache.data.spilled_counts import SpilledCounter
from dlrm_cache.data.spilled_vocab import SpilledVocabulary
from dlrm_cache.data.vocab import Vocabulary


def random_counts(rng, n: int, top: int, empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct raw values (32-bit hashes, and the empty value -1 if ``empty``) with counts 1..top:
    many ties."""
    values = np.unique(rng.integers(0, 1 << 32, size=n + 16, dtype=np.int64))[:n]
    if empty:
        values[0] = -1
    counts = rng.integers(1, top + 1, size=len(values)).astype(np.int64)
    return values, counts


def ranked_on_disk(tmp_path, values, counts, min_count, partitions, bucket_rows) -> SpilledVocabulary:
    """``values`` (ascending) handed over in ``partitions`` value ranges."""
    vocab = SpilledVocabulary(tmp_path, "f", bucket_rows)
    for part in np.array_split(np.arange(len(values)), partitions):
        vocab.add_partition(values[part], counts[part], min_count)
    return vocab


@pytest.mark.parametrize(
    "min_count,top,empty,partitions,bucket_rows",
    [
        (1, 5, True, 7, 100),
        (3, 5, True, 3, 64),
        (2, 40, False, 1, 1000),
        (6, 5, False, 5, 10),
        (9, 5, True, 4, 50),
    ],
    ids=["all-kept", "rare-among-ties", "one-partition", "few-kept", "none-kept"],
)
def test_ids_lookup_and_counts_are_those_ranked_in_memory(
    tmp_path, min_count, top, empty, partitions, bucket_rows
):
    rng = np.random.default_rng(min_count * 100 + top)
    values, counts = random_counts(rng, 3000, top, empty)
    expected = Vocabulary.fit(values, counts, min_count)
    vocab = ranked_on_disk(tmp_path, values, counts, min_count, partitions, bucket_rows)
    assert len(vocab) == len(expected) and vocab.rare_id == expected.rare_id
    for got, want in zip(vocab.histogram(), expected.histogram(), strict=True):
        np.testing.assert_array_equal(got, want)
    queries = np.concatenate([values, [-1, 7, (1 << 32) - 1], rng.integers(0, 1 << 32, 500)])
    for native in (True, False):
        np.testing.assert_array_equal(
            vocab.lookup(native).transform(queries), expected.lookup(native).transform(queries)
        )
    whole = vocab.in_memory()
    np.testing.assert_array_equal(whole.raw, expected.raw)
    np.testing.assert_array_equal(whole.count, expected.count)
    assert whole.rare_id == expected.rare_id
    assert not list(tmp_path.iterdir())  # its partition and bucket files are gone


@pytest.mark.parametrize("partition_bytes", [1 << 30, 200_000], ids=["whole-partitions", "partitions-split"])
def test_spilled_counter_writes_the_bytes_of_the_in_memory_vocabulary(tmp_path, partition_bytes):
    """Counted in many spilled runs, more ids than a row group (two buckets), each partition merged
    whole or split into pieces of ~200 KB first: the vocabulary file is the same bytes as the in-memory
    one's."""
    rng = np.random.default_rng(0)
    values, counts = random_counts(rng, 2_500_000, 3, empty=True)
    raw = np.repeat(values, counts)
    rng.shuffle(raw)
    counter = SpilledCounter(tmp_path, "f", limit=400_000)
    for chunk in np.array_split(raw, 20):
        counter.add(chunk)
    assert counter.spills > 1
    vocab = counter.fit(min_count=2, partition_bytes=partition_bytes)
    assert isinstance(vocab, SpilledVocabulary)
    expected = Vocabulary.fit(values, counts, 2)
    write_vocabulary(tmp_path / "disk.parquet", vocab)
    write_vocabulary(tmp_path / "memory.parquet", expected)
    assert (tmp_path / "disk.parquet").read_bytes() == (tmp_path / "memory.parquet").read_bytes()
    assert len(expected) > 1 << 20  # two row groups
    np.testing.assert_array_equal(vocab.lookup().transform(values), expected.lookup().transform(values))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.parquet", "memory.parquet"]


_SPILL = """
import pickle, sys
import numpy as np
from pathlib import Path
from dlrm_cache.data.spilled_counts import SpilledCounter
n, folder = int(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(1)
values = np.unique(rng.integers(0, 1 << 32, size=int(n * 1.01), dtype=np.int64))[:n]
counter = SpilledCounter(folder, "f", limit=n // 4)
for chunk in np.array_split(rng.permutation(values), 8):
    counter.add(chunk)
counter.spill()
(folder / "counter.pkl").write_bytes(pickle.dumps(counter))
"""

_RANK = """
import pickle, re, sys
from pathlib import Path
import numpy as np
from dlrm_cache.data.saved_vocab import write_vocabulary
from dlrm_cache.data.vocab import PAIR
from dlrm_cache.data.vocab import Vocabulary

def kb(field):  # this process's, not its parent's (getrusage's peak survives exec)
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])

folder, in_memory = Path(sys.argv[1]), sys.argv[2] == "memory"
counter = pickle.loads((folder / "counter.pkl").read_bytes())
if in_memory:  # the same counts read whole (each value was counted once, in one run)
    pairs = np.concatenate([np.fromfile(p, dtype=PAIR) for p in sorted(counter.files)])
    values, counts = pairs["value"].copy(), pairs["count"].copy()
    del pairs
start = kb("VmRSS")
vocab = Vocabulary.fit(values, counts, 1) if in_memory else counter.fit(1)
lookup = vocab.lookup()  # on disk: ranked, its buckets written
ranked = kb("VmHWM") - start
write_vocabulary(folder / f"{sys.argv[2]}.parquet", vocab)
print(ranked, kb("VmHWM") - start, lookup.nbytes, len(vocab))
"""


def test_ranking_on_disk_holds_the_lookup_not_the_values(tmp_path):
    """Measured in child processes, 3M kept values: ranking them from spilled counts and making their
    lookup grows the peak resident memory by ~14 bytes a value (the lookup, 8.5 bytes, which the write
    pass holds anyway; and a partition at a time), where ranking the same counts in memory grows it by
    ~57; writing the file then adds at most a row group's worth (~150 MB at 2^20 ids), whatever the
    size. The files are the same bytes either way."""
    n = 3_000_000
    run = [sys.executable, "-c"]
    subprocess.run([*run, _SPILL, str(n), str(tmp_path)], check=True, timeout=300)
    grown = {}
    for how in ("memory", "disk"):  # on disk last: it removes the spilled runs
        out = subprocess.run(
            [*run, _RANK, str(tmp_path), how], check=True, timeout=300, capture_output=True, text=True
        )
        ranked, written, lookup_bytes, size = map(int, out.stdout.split())
        assert size == n + 1 and lookup_bytes / size < 9
        grown[how] = (ranked * 1024 / n, written * 1024)
    assert grown["disk"][0] < 16 < 40 < grown["memory"][0], grown
    assert grown["disk"][1] < grown["disk"][0] * n + (200 << 20), grown
    assert (tmp_path / "disk.parquet").read_bytes() == (tmp_path / "memory.parquet").read_bytes()
