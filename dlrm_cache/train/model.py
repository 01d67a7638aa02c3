"""The model ``dlrm-train`` trains: TorchRec's ``DLRM`` or ``DLRM_DCN`` over one table per Criteo
categorical feature, built from the run's ``ModelConfig`` (what prediction and export rebuild too)."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.config import ModelConfig
from dlrm_cache.criteo import CAT_COLUMNS, INT_FEATURE_COUNT, table_name


def table_configs(embedding_dim: int, vocab_sizes: dict[str, int]) -> list[EmbeddingBagConfig]:
    """One table per feature (``CAT_COLUMNS`` order), as many rows as the feature's vocabulary."""
    return [
        EmbeddingBagConfig(
            num_embeddings=vocab_sizes[f], embedding_dim=embedding_dim, name=table_name(f), feature_names=[f]
        )
        for f in CAT_COLUMNS
    ]


def dlrm_model(model: ModelConfig, ebc: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DLRM`` (``model.name=dlrm``) or ``DLRM_DCN`` (``dcn``) over ``ebc``, its dense part on ``device``."""
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=INT_FEATURE_COUNT,
        dense_arch_layer_sizes=model.dense_arch_layer_sizes,
        over_arch_layer_sizes=model.over_arch_layer_sizes,
        dense_device=device,
    )
    if model.name == "dcn":
        dcn = dict(dcn_num_layers=model.dcn_num_layers, dcn_low_rank_dim=model.dcn_low_rank_dim)
        return DLRM_DCN(**common, **dcn)
    return DLRM(**common)
