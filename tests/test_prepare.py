"""A batch's ids made ready for the cache: the C++ preparation gives exactly torch's tensors, and the
batch signature's C++ checksum exactly torch's sum."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.cache.batch_signature import position_checksum
from dlrm_cache.cache.layout import GroupLayout
from dlrm_cache.cache.prepare import NativePrepare, prepare_torch

FIELDS = ("uniq", "inverse", "occurrences", "offsets", "lookups", "one_hot", "batch_size")


def layout(rows: list[int], features_per_table: list[int]) -> GroupLayout:
    tables, f = [], 0
    for t, (r, k) in enumerate(zip(rows, features_per_table, strict=True)):
        names = [f"f{f + i}" for i in range(k)]
        f += k
        tables.append(
            EmbeddingBagConfig(num_embeddings=r, embedding_dim=4, name=f"t{t}", feature_names=names)
        )
    return GroupLayout(tables, [1] * len(tables))


def batch_ids(lay: GroupLayout, batch: int, max_bag: int, seed: int, skew: bool = False):
    """A KeyedJaggedTensor's values for the group's features, after another feature's ids (so that
    the group's features do not start at 0), their starts and (F, B) lengths."""
    g = torch.Generator().manual_seed(seed)
    nf = len(lay.features)
    if max_bag == 1:
        lengths = torch.ones(nf, batch, dtype=torch.int64)
    else:
        lengths = torch.randint(0, max_bag + 1, (nf, batch), generator=g)
    parts = [torch.randint(0, 9, (5,), generator=g)]
    for f in range(nf):
        rows = lay.rows[int(lay.feature_table[f])]
        n = int(lengths[f].sum())
        if skew:  # most ids among a table's first rows, as frequency-ranked ids are
            ids = (torch.rand(n, generator=g) ** 4 * rows).to(torch.int64)
        else:
            ids = torch.randint(0, rows, (n,), generator=g)
        parts.append(ids)
    starts = torch.tensor([len(p) for p in parts]).cumsum(0)[:-1].tolist()  # where f0, f1, ... start
    return torch.cat(parts), starts, lengths


def assert_equal(want, got) -> None:
    for k in FIELDS:
        a, b = getattr(want, k), getattr(got, k)
        assert (a is None) == (b is None), k
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
        else:
            assert a == b, k


def assert_same(lay: GroupLayout, values, starts, lengths) -> None:
    assert_equal(prepare_torch(values, starts, lengths, lay), NativePrepare(lay)(values, starts, lengths))


@pytest.mark.parametrize("max_bag", [1, 3, 12])
@pytest.mark.parametrize(
    "rows,features",
    [
        ([7], [1]),  # one tiny table: counted
        ([50, 5_000_000], [2, 1]),  # a table sorted (rows >> its ids: three passes), two features in one
        ([1, 200_000, 40, 70_000], [1, 1, 3, 2]),
    ],
)
@pytest.mark.parametrize("batch", [1, 97, 20_000])  # 20,000: past the size that goes over the threads
def test_native_preparation_gives_torchs_tensors(rows, features, max_bag, batch):
    lay = layout(rows, features)
    for seed, skew in ((0, False), (1, True)):
        assert_same(lay, *batch_ids(lay, batch, max_bag, seed, skew))


def test_the_same_on_one_thread_and_several():
    lay = layout([100, 500_000, 30_000], [1, 2, 1])
    values, starts, lengths = batch_ids(lay, 20_000, 4, 3, skew=True)
    prepare = NativePrepare(lay)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prepare(values, starts, lengths)
    finally:
        torch.set_num_threads(threads)
    assert_equal(one, prepare(values, starts, lengths))


def test_empty_bags_everywhere():
    lay = layout([10, 1000], [1, 1])
    values = torch.empty(0, dtype=torch.int64)
    lengths = torch.zeros(2, 5, dtype=torch.int64)
    assert_same(lay, values, [0, 0], lengths)
    got = NativePrepare(lay)(values, [0, 0], lengths)
    assert len(got.uniq) == 0 and torch.equal(got.offsets, torch.zeros(11, dtype=torch.int64))


@pytest.mark.parametrize("bad_id", [-1, 40, 10**9])
@pytest.mark.parametrize("batch", [13, 6000])
def test_an_id_outside_its_table_is_refused_alike(bad_id, batch):
    """Both name the first id outside its table, in the group's feature order."""
    lay = layout([40, 300_000], [2, 1])
    values, starts, lengths = batch_ids(lay, batch, 3, 4)
    # feature f1 (the second of table t0) gets the bad id, and so does f2, later in the order
    values[starts[1] + int(lengths[1].sum()) // 2] = bad_id
    values[starts[2]] = -5
    errors = []
    for prepare in (lambda *a: prepare_torch(*a, lay), NativePrepare(lay)):
        with pytest.raises(ValueError, match="is outside its table") as e:
            prepare(values, starts, lengths)
        errors.append(str(e.value))
    assert errors[0] == errors[1] == f"feature 'f1': id {bad_id} is outside its table 't0' of 40 rows"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_the_batch_checksum_is_torchs_sum_of_weighted_ids_wrapping_around(dtype):
    g = torch.Generator().manual_seed(5)
    info = torch.iinfo(dtype)
    cases = [
        torch.randint(info.min, info.max, (100_003,), generator=g, dtype=dtype),  # products wrap around
        torch.tensor([info.max, info.min, -1, 0, 1], dtype=dtype),
        torch.empty(0, dtype=dtype),
        torch.arange(10, dtype=dtype)[::2],  # not contiguous
    ]
    for t in cases:
        want = (t.to(torch.int64) * torch.arange(1, len(t) + 1, dtype=torch.int64)).sum()
        assert torch.equal(position_checksum(t), want)
