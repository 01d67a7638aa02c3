"""Property: with policy=lookahead, a row needed inside the window is never evicted while the
window fits in the cache (Belady's rule inside the window). Rows of the current batch may be served
from the host instead of admitted (bypass), so admission is not asserted here."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig

ROWS, CAPACITY = 200, 20

batch_ids = st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(batch_ids, min_size=2, max_size=25), lookahead=st.integers(1, 4))
def test_rows_needed_in_the_window_stay_cached(batches, lookahead):
    table = EmbeddingBagConfig(num_embeddings=ROWS, embedding_dim=2, name="t", feature_names=["f"])
    cfg = CacheConfig(
        policy="lookahead", ratio=CAPACITY / ROWS, lookahead=lookahead, full_table_rows=0, warmup_ratio=0.5
    )
    ebc = CachedEmbeddingBagCollection([table], cfg, SparseOptimizer("sgd"))
    group = ebc.groups[0]
    kjts = [
        KeyedJaggedTensor(keys=["f"], values=torch.tensor(ids), lengths=torch.tensor([len(ids)]))
        for ids in batches
    ]
    for k in kjts[:lookahead]:
        ebc.enqueue(k)
    for i, kjt in enumerate(kjts):
        if i + lookahead < len(kjts):
            ebc.enqueue(kjts[i + lookahead])
        window = {r for ids in batches[i + 1 : i + 1 + lookahead] for r in ids}
        needed = window | set(batches[i])
        cached_before = set(group.state.slot_to_row[group.state.slot_to_row >= 0].tolist())
        ebc(kjt).values().sum().backward()
        cached_after = set(group.state.slot_to_row[group.state.slot_to_row >= 0].tolist())
        if len(needed) <= CAPACITY:
            evicted = cached_before - cached_after
            assert not (evicted & window), f"step {i}: evicted {evicted & window}, needed within the window"
