"""``dlrm-export``: a run's trained model for TorchRec alone.

``model.json`` says how to build it (TorchRec's class, layer sizes, DCN settings, each table's name,
rows, dim and features, the dense features and their transform); ``model.pt`` is the state dict of
``torchrec.models.dlrm.DLRM`` (or ``DLRM_DCN``) built so over a plain ``EmbeddingBagCollection``: it
loads with ``strict=True`` and scores exactly as the trained model does. The folder appears whole or
not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dlrm_cache.config import ExportConfig
from dlrm_cache.criteo import DENSE_TRANSFORM, INT_COLUMNS, INT_FEATURE_COUNT
from dlrm_cache.files import atomic_file, folder_beside, refuse_foreign, swap_in
from dlrm_cache.train.trained_run import TrainedRun, load_run

EXPORT_FILES = ("model.json", "model.pt")


def model_json(run: TrainedRun) -> dict:
    m = run.model
    return {
        "torchrec_class": "torchrec.models.dlrm." + ("DLRM_DCN" if m.name == "dcn" else "DLRM"),
        "model": m.name,
        "embedding_dim": m.embedding_dim,
        "dense_in_features": INT_FEATURE_COUNT,
        "dense_arch_layer_sizes": m.dense_arch_layer_sizes,
        "over_arch_layer_sizes": m.over_arch_layer_sizes,
        "dcn_num_layers": m.dcn_num_layers if m.name == "dcn" else None,
        "dcn_low_rank_dim": m.dcn_low_rank_dim if m.name == "dcn" else None,
        "tables": [
            {
                "name": t.name,
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "feature_names": t.feature_names,
            }  # fmt: skip
            for t in run.tables
        ],
        "dense_features": INT_COLUMNS,
        "dense_transform": DENSE_TRANSFORM,
        "vocabulary": str(run.data_path / "vocab") if run.data_path else None,
        "trained_steps": run.step,
        "run_dir": str(run.run_dir.resolve()),
    }


def export(cfg: ExportConfig) -> Path:
    """Write ``model.json`` and ``model.pt`` into ``cfg.output``; returns it."""
    out = Path(cfg.output)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output={out} is a file, not a folder")
        held = sorted(p.name for p in out.iterdir())
        if held and not cfg.overwrite:
            raise FileExistsError(
                f"output={out} is not empty; pass overwrite=true to replace an export there"
            )
        refuse_foreign(out, EXPORT_FILES, f"output={out}", "dlrm-export", ": choose another output")
    run = load_run(Path(cfg.run_dir))
    tmp = folder_beside(out)
    try:
        with atomic_file(tmp / "model.pt") as f:
            torch.save(run.state_dict(), f)
        with atomic_file(tmp / "model.json") as f:
            f.write(json.dumps(model_json(run), indent=2).encode())
        swap_in(tmp, out)  # the old export moves aside only once the new one is whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
