"""Shared by the cache benchmarks: Criteo-like id traces (one-hot, and MLPerf's multi-hot bags) and the
Criteo Kaggle and 1TB table sets."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.criteo import CAT_COLUMNS, KAGGLE_CARDINALITIES, TERABYTE_CARDINALITIES, table_name
from dlrm_cache.data.multi_hot import MultiHot
from dlrm_cache.data.zipf import ZipfSampler


def kaggle_tables(dim: int, scale: float = 1.0) -> list[EmbeddingBagConfig]:
    return _tables(KAGGLE_CARDINALITIES, dim, scale)


def terabyte_tables(dim: int, scale: float = 1.0, cap: int = 40_000_000) -> list[EmbeddingBagConfig]:
    """Criteo 1TB's tables as MLPerf has them (at most ``cap`` rows: hashed), ``scale``d, the cap too."""
    return _tables([min(n, cap) for n in TERABYTE_CARDINALITIES], dim, scale)


def _tables(cardinalities: list[int], dim: int, scale: float) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            num_embeddings=max(1, round(n * scale)), embedding_dim=dim, name=table_name(f), feature_names=[f]
        )
        for f, n in zip(CAT_COLUMNS, cardinalities, strict=True)
    ]


def zipf_trace(
    tables: list[EmbeddingBagConfig], steps: int, batch: int, zipf: float, seed: int
) -> list[np.ndarray]:
    """``steps`` arrays of shape (tables, batch): one id per sample and feature, frequency-ranked
    (id 0 is the hottest), as ``dlrm-preprocess`` writes them."""
    rng = np.random.default_rng(seed)
    samplers = [ZipfSampler(t.num_embeddings, zipf) for t in tables]
    return [np.stack([s.sample(rng, batch) for s in samplers]) for _ in range(steps)]


class BagStep:
    """One multi-hot trace step: per table, its ``batch`` bags of ``sizes[t]`` ids, sample-major."""

    def __init__(self, ids: list[np.ndarray], sizes: tuple[int, ...]):
        self.ids, self.sizes = ids, sizes

    def __getitem__(self, table: int) -> np.ndarray:
        return self.ids[table]


def multi_hot_trace(
    tables: list[EmbeddingBagConfig], steps: int, batch: int, zipf: float, seed: int, multi: MultiHot
) -> list[BagStep]:
    """``steps`` batches of ``batch`` samples: Zipf values, each expanded to its bag as
    ``dlrm-preprocess`` does (over the table in a dictionary order: here a fixed random permutation of
    the values), then every table's ids frequency-ranked over the whole trace (id 0 the hottest, as the
    expanded counts rank them)."""
    rng = np.random.default_rng(seed)
    samplers = [ZipfSampler(t.num_embeddings, zipf) for t in tables]
    orders = [rng.permutation(t.num_embeddings) for t in tables]  # value rank -> dictionary position
    trace = []
    for _ in range(steps):
        ids = []
        for f, (s, order) in enumerate(zip(samplers, orders, strict=True)):
            positions = order[s.sample(rng, batch)]
            extra = multi.draws(f, positions, len(order))
            ids.append(np.concatenate([positions[:, None], extra], axis=1).reshape(-1))
        trace.append(BagStep(ids, multi.sizes))
    for f, t in enumerate(tables):
        counts = np.zeros(t.num_embeddings, dtype=np.int64)
        for step in trace:
            counts += np.bincount(step.ids[f], minlength=t.num_embeddings)
        rank = np.empty(t.num_embeddings, dtype=np.int64)
        rank[np.argsort(-counts, kind="stable")] = np.arange(t.num_embeddings)
        for step in trace:
            step.ids[f] = rank[step.ids[f]]
    return trace


def to_kjt(step: np.ndarray | BagStep, tables: list[EmbeddingBagConfig]) -> KeyedJaggedTensor:
    """One trace step: (tables, batch) ids, one a bag, or a ``BagStep``."""
    keys = [t.feature_names[0] for t in tables]
    if isinstance(step, BagStep):
        batch = len(step.ids[0]) // step.sizes[0]
        lengths = torch.tensor(step.sizes, dtype=torch.int32).repeat_interleave(batch)
        return KeyedJaggedTensor(keys, torch.from_numpy(np.concatenate(step.ids)), lengths=lengths)
    n_tables, batch = step.shape
    values, lengths = torch.from_numpy(step.reshape(-1)), torch.ones(n_tables * batch, dtype=torch.int32)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
