"""A training step makes no call that would wait for the device (a host sync on CUDA).

The step runs as the trainer runs it (``Trainer.train_step``: dense and sparse forward, the next batch
planned, backward with the fused sparse update, the dense update) with the model and the cache on the
``meta`` device: tensors with shapes and no data, where every operation that needs the device's data
on the host raises (``item``, ``bool``, ``nonzero``, ``unique``, ``bincount``, a copy to the host, a
boolean mask, ...), as each would sync on CUDA. The host tier and the ids stay on the host, as on a GPU.

Two copies to the host are allowed in a step, and stubbed here: the bookkeeping thread's (evictions:
that thread may wait, it is not the training thread) and the non-blocking copy of host-served rows
into pinned memory (``TorchRows.to_host``; on CUDA it is ``CudaRows.to_host``, which does not wait).
"""

from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.cache.batch_signature import FeedCheck, Signature
from dlrm_cache.cache.row_movers import TorchRows
from dlrm_cache.config import (
    CacheConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainLoopConfig,
    TrainRunConfig,
)
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.distributed.rank import Rank
from dlrm_cache.train.embeddings import LocalEmbeddings, build_model
from dlrm_cache.train.train_state import TrainState, dense_optimizer
from dlrm_cache.train.trainer import Trainer

META = torch.device("meta")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(
        tmp_path_factory.mktemp("data"), 6_000, 0.002, row_group_rows=1024, progress=False
    )


@pytest.fixture
def allowed_host_copies(monkeypatch):
    """The two sanctioned copies to the host, stubbed (on ``meta`` they would raise: no data)."""
    monkeypatch.setattr(TorchRows, "copy_out", lambda self, cache, slots, host, rows, after: None)
    monkeypatch.setattr(TorchRows, "to_host", lambda self, t: (torch.zeros(t.shape, dtype=t.dtype), None))


def train_config(root: Path, cache: CacheConfig, optim: OptimConfig) -> TrainRunConfig:
    return TrainRunConfig(
        data=DataConfig(path=str(root)),
        model=ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]),
        cache=cache,
        optim=optim,
        train=TrainLoopConfig(batch_size=256, log_every=1000, max_steps=1000),
    )


def trainer_on_meta(root: Path, tmp_path: Path, cache: CacheConfig, optim: OptimConfig) -> Trainer:
    cfg = train_config(root, cache, optim)
    meta = load_metadata(root)
    model, ebc = build_model(cfg, meta, META)
    runtime = LocalEmbeddings(model, ebc)
    dense = [p for p in model.parameters() if p.requires_grad]
    state = TrainState(cfg, model, dense_optimizer(cfg, dense), root, meta)
    loader = ParquetBatches(root, "train", cfg.train.batch_size)
    return Trainer(cfg, tmp_path, Rank(), META, runtime, state, {"train": loader})


@pytest.mark.parametrize(
    "ratio, optim",
    [
        (0.001, OptimConfig(sparse="adagrad", dense="adagrad")),  # host-served rows every step
        (0.3, OptimConfig(sparse="adam", dense="adam", sparse_lr=0.001, dense_lr=0.001)),
        (0.3, OptimConfig(sparse="sgd", dense="sgd")),
    ],
    ids=["overflowing-adagrad", "normal-adam", "normal-sgd"],
)
@pytest.mark.parametrize("bookkeeping", ["inline", "thread"])
def test_a_training_step_makes_no_call_that_would_sync(dataset, tmp_path, allowed_host_copies, ratio, optim,
                                                        bookkeeping):  # fmt: skip
    cache = CacheConfig(policy="lookahead", ratio=ratio, lookahead=4, full_table_rows=100, warmup_ratio=0.5,
                        bookkeeping=bookkeeping)  # fmt: skip
    trainer = trainer_on_meta(dataset, tmp_path, cache, optim)
    steps = 0
    for batch in trainer._lookahead(0, 0):
        trainer.train_step(batch)  # raises at the first operation that would wait for the device
        steps += 1
        if steps == 12:
            break
    stats = trainer.runtime.stats()
    trainer.runtime.close()
    assert steps == 12 and trainer.state.step == 12
    if ratio < 0.01:
        assert stats["rows_from_host"] > 0  # the host-served path was taken
    assert all(len(loss.shape) == 0 and loss.device == META for _, loss in trainer.losses)


def test_the_check_can_fail(dataset, tmp_path, allowed_host_copies, monkeypatch):
    """A step that reads a figure from the device, as the loss logging once did every step, fails."""
    cache = CacheConfig(policy="lookahead", ratio=0.3, lookahead=4, full_table_rows=100)
    trainer = trainer_on_meta(dataset, tmp_path, cache, OptimConfig(sparse="sgd", dense="sgd"))
    read_each_step = trainer.runtime.mean_loss
    monkeypatch.setattr(trainer.runtime, "mean_loss", lambda loss: float(read_each_step(loss)))
    with pytest.raises(RuntimeError, match="meta"):
        trainer.train_step(next(iter(trainer._lookahead(0, 0))))
    trainer.runtime.close()


def kjt(ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["f0"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32)
    )


def test_a_wrong_batch_found_on_a_device_raises_at_the_next_check():
    """Ids on a device are compared there (no sync): the verdict is read later, and a wrong batch raises."""
    check = FeedCheck()
    check.compare(Signature.of(kjt([1, 2, 3])), Signature.of(kjt([1, 2, 3])))
    check.raise_if_wrong()
    check.compare(Signature.of(kjt([1, 3, 2])), Signature.of(kjt([1, 2, 3])))  # reordered ids differ
    check.compare(
        Signature.of(kjt([1, 2, 3])), Signature.of(kjt([1, 2, 3]))
    )  # a later good one hides nothing
    with pytest.raises(ValueError, match="other than the next one"):
        check.raise_if_wrong()
    check.raise_if_wrong()  # read once
    with pytest.raises(ValueError, match="other than the next one"):  # other sizes: known on the host at once
        check.compare(Signature.of(kjt([1, 2])), Signature.of(kjt([1, 2, 3])))


def test_a_forward_on_ids_other_than_the_enqueued_ones_raises(dataset):
    """Ids on the host are compared at once."""
    cache = CacheConfig(policy="lookahead", ratio=0.3, lookahead=4, full_table_rows=100)
    cfg = train_config(dataset, cache, OptimConfig(sparse="sgd", dense="sgd"))
    model, ebc = build_model(cfg, load_metadata(dataset), torch.device("cpu"))
    first, second = list(ParquetBatches(dataset, "train", 256).batches(0))[:2]
    ebc.enqueue(first.sparse_features)
    with pytest.raises(ValueError, match="other than the next one"):
        model(second.dense_features, second.sparse_features)
    ebc.close()


def test_a_signature_ignores_nothing_of_the_batch():
    base = Signature.of(kjt([5, 6, 7]))
    assert base.matches(Signature.of(kjt([5, 6, 7])))
    assert not base.matches(Signature.of(kjt([5, 7, 6])))
    assert not base.matches(Signature.of(replace_keys(kjt([5, 6, 7]), ["g0"])))
    lengths = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([5, 6, 7]), lengths=torch.tensor([2, 0, 1]))
    assert not base.matches(Signature.of(lengths))


def replace_keys(k: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=keys, values=k.values(), lengths=k.lengths())
