"""Shared by the cache benchmarks: a Criteo-like id trace and the Criteo Kaggle table set."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.criteo import CAT_COLUMNS, KAGGLE_CARDINALITIES, table_name
from dlrm_cache.data.zipf import ZipfSampler


def kaggle_tables(dim: int, scale: float = 1.0) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            num_embeddings=max(1, round(n * scale)), embedding_dim=dim, name=table_name(f), feature_names=[f]
        )
        for f, n in zip(CAT_COLUMNS, KAGGLE_CARDINALITIES, strict=True)
    ]


def zipf_trace(
    tables: list[EmbeddingBagConfig], steps: int, batch: int, zipf: float, seed: int
) -> list[np.ndarray]:
    """``steps`` arrays of shape (tables, batch): one id per sample and feature, frequency-ranked
    (id 0 is the hottest), as ``dlrm-preprocess`` writes them."""
    rng = np.random.default_rng(seed)
    samplers = [ZipfSampler(t.num_embeddings, zipf) for t in tables]
    return [np.stack([s.sample(rng, batch) for s in samplers]) for _ in range(steps)]


def to_kjt(ids: np.ndarray, tables: list[EmbeddingBagConfig]) -> KeyedJaggedTensor:
    n_tables, batch = ids.shape
    return KeyedJaggedTensor(
        keys=[t.feature_names[0] for t in tables],
        values=torch.from_numpy(ids.reshape(-1)),
        lengths=torch.ones(n_tables * batch, dtype=torch.int32),
    )
