"""``dlrm-export``: a run's trained model for TorchRec alone.

``model.json`` says how to build it (TorchRec's class, layer sizes, DCN settings, each table's name,
rows, dim and features, the dense features and their transform); ``model.pt`` is the state dict of
``torchrec.models.dlrm.DLRM`` (or ``DLRM_DCN``) built so over a plain ``EmbeddingBagCollection``: it
loads with ``strict=True`` and scores exactly as the trained model does. The folder appears whole or
not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dlrm_cache.config import ExportConfig
from dlrm_cache.criteo import INT_COLUMNS, INT_FEATURE_COUNT
from dlrm_cache.distributed.checkpoint import atomic_file
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
        "dense_transform": "log1p(max(x, 0)) as float32; missing -> 0",
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
        foreign = [name for name in held if name not in EXPORT_FILES]
        if foreign:
            raise FileExistsError(
                f"output={out} holds what dlrm-export did not write ({', '.join(foreign[:5])}): "
                "choose another output"
            )
    run = load_run(Path(cfg.run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        with atomic_file(tmp / "model.pt") as f:
            torch.save(run.state_dict(), f)
        with atomic_file(tmp / "model.json") as f:
            f.write(json.dumps(model_json(run), indent=2).encode())
        if out.exists():  # the old export moves aside only once the new one is whole
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
