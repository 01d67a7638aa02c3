"""dlrm-predict and dlrm-export against the trainer's own evaluation of the same rows."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics
from test_train import config
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.config import ExportConfig, ModelConfig, PredictConfig, SynthConfig, TrainerConfig
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.data.synthetic import generate
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.train.dense_state import load_dense_state
from dlrm_cache.train.embeddings import build_model
from dlrm_cache.train.export import export
from dlrm_cache.train.predict import predict, read_predictions
from dlrm_cache.train.trained_run import load_run
from dlrm_cache.train.trainer import train

DCN = ModelConfig(
    name="dcn",
    embedding_dim=8,
    dense_arch_layer_sizes=[32, 8],
    over_arch_layer_sizes=[32, 1],
    dcn_num_layers=2,
    dcn_low_rank_dim=4,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(
        tmp_path_factory.mktemp("data"), 20_000, 0.002, row_group_rows=4096, progress=False
    )


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A trained run (25 steps of 512) and its summary."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, train(config(dataset), run_dir)


@pytest.fixture(scope="module")
def val_tsv(dataset, tmp_path_factory):
    """The raw lines of the dataset's val split, as a TSV file of their own."""
    lines = (dataset.parent / "train.txt").read_text().splitlines(keepends=True)
    split = json.loads((dataset / "metadata.json").read_text())["split_lines"][0]
    path = tmp_path_factory.mktemp("raw") / "val.txt"
    path.write_text("".join(lines[split["train_last_line"] : split["val_last_line"]]))
    return path


def scores_of(model, loader):
    with torch.no_grad():
        out = [
            torch.sigmoid(model(b.dense_features, b.sparse_features).squeeze(1)) for b in loader.batches(0)
        ]
    model.train()
    return torch.cat(out).numpy()


def trainer_scores(cfg, run_dir, dataset, split):
    """Per-row scores of the trainer's own model (the cache kernel) loaded from the run's checkpoint."""
    found = ckpt.find_checkpoint(run_dir)
    state = ckpt.load_meta(found)
    model, cache = build_model(cfg, load_metadata(dataset), torch.device("cpu"))
    load_dense_state(model, state["model"])
    ckpt.load_embeddings(found, state["world_size"], [(cache, {})])
    model.eval()
    try:
        return scores_of(model, ParquetBatches(dataset, split, cfg.train.batch_size, drop_last=False))
    finally:
        cache.close()


def auc(scores, labels):
    metric = torchmetrics.classification.BinaryAUROC()
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels).long())
    return float(metric.compute())


def test_predictions_equal_the_trainers_evaluation_row_by_row(run, dataset, val_tsv, tmp_path):
    run_dir, summary = run
    from_folder = predict(
        PredictConfig(
            run_dir=str(run_dir),
            input=str(dataset),
            split="val",
            output=str(tmp_path / "val.csv"),
            progress=False,
        )
    )
    got = read_predictions(from_folder)
    assert list(got) == ["probability", "label"]
    probability = got["probability"].astype(np.float32)
    np.testing.assert_array_equal(probability, trainer_scores(config(dataset), run_dir, dataset, "val"))
    assert auc(probability, got["label"]) == pytest.approx(summary["val_auc"], abs=1e-7)
    assert len(probability) == load_metadata(dataset)["rows"]["val"] > 0
    # the raw lines of the same split, encoded with the run's vocabulary, score the same, in order
    from_tsv = read_predictions(
        predict(
            PredictConfig(
                run_dir=str(run_dir), input=str(val_tsv), output=str(tmp_path / "raw.csv"), progress=False
            )
        )
    )
    np.testing.assert_array_equal(from_tsv["probability"], got["probability"])
    np.testing.assert_array_equal(
        from_tsv["label"], [int(line[0]) for line in val_tsv.read_text().splitlines()]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv", "val.csv"]  # no encoding left behind


def test_scoring_through_a_mapped_cache_gives_the_same_scores(run, dataset, tmp_path):
    """host=mmap: the tables (with their optimizer state) in files, not in RAM, for tables beyond it."""
    run_dir, _ = run
    common = dict(run_dir=str(run_dir), input=str(dataset), split="val", progress=False)
    plain = read_predictions(predict(PredictConfig(**common, output=str(tmp_path / "plain.csv"))))
    (tmp_path / "maps").mkdir()
    mapped = predict(PredictConfig(**common, output=str(tmp_path / "mapped.csv"), host="mmap",
                                   mmap_dir=str(tmp_path / "maps")))  # fmt: skip
    np.testing.assert_array_equal(read_predictions(mapped)["probability"], plain["probability"])
    assert list((tmp_path / "maps").iterdir()) == []  # the host files go with the run
    trained = load_run(run_dir)
    _, ebc = trained.cached_model(replace(trained.cache, host="mmap", mmap_dir=str(tmp_path / "maps")))
    held = sum(f.stat().st_size for f in (tmp_path / "maps").iterdir())
    assert held >= sum(t.num_embeddings * (8 + 1) * 4 for t in trained.tables)  # weights + Adagrad's state
    ebc.close()
    assert list((tmp_path / "maps").iterdir()) == []


def test_kaggle_test_file_gets_ids_from_60000000(run, tmp_path):
    run_dir, _ = run
    test_txt = tmp_path / "test.txt"
    generate(
        SynthConfig(
            rows=1234, out=str(test_txt), cardinality_scale=0.002, labeled=False, seed=7, progress=False
        )
    )
    out = predict(
        PredictConfig(
            run_dir=str(run_dir), input=str(test_txt), output=str(tmp_path / "sub.csv"), progress=False
        )
    )
    lines = out.read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 1235
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    assert ids == list(range(60_000_000, 60_001_234))
    assert all(0 < float(line.split(",")[1]) < 1 for line in lines[1:])


def test_a_sharded_hybrid_checkpoint_scores_like_its_evaluation(dataset, tmp_path):
    hybrid = replace(config(dataset), trainer=TrainerConfig(sharded=True, sharding="hybrid"))
    summary = train(hybrid, tmp_path / "run")
    pieces = ckpt.pieces(ckpt.find_checkpoint(tmp_path / "run"), 1)
    assert any(p.row_offset for p in pieces), "hot and cold rows are pieces of their own"
    got = read_predictions(
        predict(
            PredictConfig(
                run_dir=str(tmp_path / "run"),
                input=str(dataset),
                split="test",
                output=str(tmp_path / "t.csv"),
                progress=False,
            )
        )
    )
    assert auc(got["probability"].astype(np.float32), got["label"]) == pytest.approx(
        summary["test_auc"], abs=1e-6
    )


@pytest.mark.parametrize("model", ["dlrm", "dcn"])
def test_the_export_loads_strictly_into_plain_torchrec_and_scores_alike(dataset, tmp_path, model):
    cfg = config(dataset) if model == "dlrm" else replace(config(dataset), model=DCN)
    train(cfg, tmp_path / "run")
    out = export(ExportConfig(run_dir=str(tmp_path / "run"), output=str(tmp_path / "export")))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt"]
    plain, spec = exported_model(out)
    assert spec["torchrec_class"].endswith(type(plain).__name__)
    loader = ParquetBatches(dataset, "val", cfg.train.batch_size, drop_last=False)
    np.testing.assert_array_equal(
        scores_of(plain, loader), trainer_scores(cfg, tmp_path / "run", dataset, "val")
    )
    assert spec["vocabulary"] == str(dataset.resolve() / "vocab")


def exported_model(out):
    """The model an export describes, built from its model.json with TorchRec alone and loaded strictly
    from its model.pt, in eval mode; and the model.json."""
    spec = json.loads((out / "model.json").read_text())
    tables = [
        EmbeddingBagConfig(**{k: t[k] for k in ("name", "num_embeddings", "embedding_dim", "feature_names")})
        for t in spec["tables"]
    ]
    common = dict(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=spec["dense_in_features"],
        dense_arch_layer_sizes=spec["dense_arch_layer_sizes"],
        over_arch_layer_sizes=spec["over_arch_layer_sizes"],
    )
    if spec["model"] == "dcn":
        plain = DLRM_DCN(
            **common, dcn_num_layers=spec["dcn_num_layers"], dcn_low_rank_dim=spec["dcn_low_rank_dim"]
        )
    else:
        plain = DLRM(**common)
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    return plain.eval(), spec


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(run, dataset, val_tsv, tmp_path):
    run_dir, _ = run

    def cfg(**kw):
        return PredictConfig(
            **{
                "run_dir": str(run_dir),
                "input": str(val_tsv),
                "output": str(tmp_path / "p.csv"),
                "progress": False,
                **kw,
            }
        )

    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="empty_run: no checkpoint"):
        predict(cfg(run_dir=str(tmp_path / "empty_run")))
    with pytest.raises(ValueError, match="empty_run: no checkpoint"):
        export(ExportConfig(run_dir=str(tmp_path / "empty_run"), output=str(tmp_path / "e")))
    broken = tmp_path / "broken.txt"
    lines = val_tsv.read_text().splitlines(keepends=True)
    broken.write_text("".join(lines[:5]) + "1\tx" + lines[5][3:] + "".join(lines[6:20]))
    with pytest.raises(ValueError, match=r"broken.txt:6: field int_0"):
        predict(cfg(input=str(broken)))
    other = synthetic_dataset(tmp_path / "other", 3000, 0.001, progress=False)  # another vocabulary
    with pytest.raises(ValueError, match="encoded with another vocabulary"):
        predict(cfg(input=str(other)))
    with pytest.raises(ValueError, match="data_path .*other/parquet: encoded with another vocabulary"):
        predict(cfg(data_path=str(other)))  # refused before the input is parsed
    with pytest.raises(FileNotFoundError, match="data_path=.*nowhere: not a dlrm-preprocess output"):
        predict(cfg(data_path=str(tmp_path / "nowhere")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.txt", "empty_run", "other"]
    (tmp_path / "p.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="p.csv exists; pass overwrite=true"):
        predict(cfg())
    assert (tmp_path / "p.csv").read_text() == "mine"


def test_an_export_is_replaced_only_when_asked_and_nothing_else_is_touched(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "export"
    export(ExportConfig(run_dir=str(run_dir), output=str(out)))
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=true"):
        export(ExportConfig(run_dir=str(run_dir), output=str(out)))
    before = (out / "model.pt").stat().st_mtime_ns
    export(ExportConfig(run_dir=str(run_dir), output=str(out), overwrite=True))
    assert (out / "model.pt").stat().st_mtime_ns != before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        export(ExportConfig(run_dir=str(run_dir), output=str(out), overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left


def test_the_commands_run_from_the_shell(run, dataset, tmp_path):
    run_dir, _ = run
    cli = [sys.executable, "-m"]
    done = subprocess.run(
        [
            *cli,
            "dlrm_cache.cli.predict",
            f"run_dir={run_dir}",
            f"input={dataset}",
            "split=test",
            f"output={tmp_path / 'p.csv'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + load_metadata(dataset)["rows"]["test"]
    done = subprocess.run(
        [*cli, "dlrm_cache.cli.export", f"run_dir={run_dir}", f"output={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(
        [*cli, "dlrm_cache.cli.export", f"run_dir={tmp_path / 'nope'}", f"output={tmp_path / 'y'}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"dlrm-export: error: run_dir={tmp_path / 'nope'}: no such folder"
    ]
    assert Path(tmp_path / "x" / "model.pt").is_file()
