"""What the cache core reads from a table's config, for callers without TorchRec.

A TorchRec ``EmbeddingBagConfig`` serves as it is; ``TableSpec`` has the same fields, so the core runs
where only torch is installed (a GPU machine's check, ``tests/test_gpu.py``, the device benchmark)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableSpec:
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)
    pooling: str = "SUM"
