"""``trainer.sharding=hybrid``: hot rows replicated on every rank, cold rows sharded behind the cache.

Ids are numbered by frequency, so the hot rows of table ``t`` are ``[0, H_t)`` (``H_t`` chosen by
``comm_model`` for every table, small ones too: a row is replicated only where that sends fewer bytes
than sharding it). A rank's batch is split before TorchRec's input distribution:

- **hot ids** are looked up in the rank's own replica (``HotRows``), for its own samples only;
- **cold ids** travel, and only they: each rank that owns cold rows holds one *cold table*, the cold
  rows of its tables one after the other, looked up through one feature, ``cold_rank<r>``. The cold
  feature's bags are the (sample, feature) bags that have cold ids, not every sample's, so TorchRec's
  all-to-alls move the cold ids, their bag lengths and one pooled row (and its gradient) per cold bag.
  All cold features of a batch share one stride, the largest number of cold bags of any owner on that
  rank (the others padded with empty bags); strides may differ between ranks (TorchRec sends them).

The pooled output is the sum of the two parts per bag (mean pooling divides that sum by the bag's
length), in TorchRec's ``KeyedTensor`` layout: ``HybridEmbeddingBagCollection`` stands where an
``EmbeddingBagCollection`` stands in ``torchrec.models.dlrm.DLRM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm_cache.cache.batch_signature import WRONG_FEED
from dlrm_cache.cache.collection import CachedEmbeddingBagCollection, feature_index
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.transfer import to_device
from dlrm_cache.distributed.hot_rows import HotRows

COLD_FEATURE = "cold_rank{}"


@dataclass(frozen=True)
class Segment:
    """A table's cold rows ``[hot_rows, rows)`` inside its owner's cold table."""

    table: str
    feature: str
    hot_rows: int
    rows: int

    @property
    def cold_rows(self) -> int:
        return self.rows - self.hot_rows


@dataclass(frozen=True)
class ColdTable:
    """How the sharder's kernel builds the cache of one owner's cold table (``CacheSpec.collections``):
    a ``ColdCollection`` over its segments, each initialised as its full table (TorchRec's default
    bounds: the full table's size, not the part's)."""

    feature: str
    segments: tuple[Segment, ...]

    def __call__(self, table, spec, device) -> tuple[CachedEmbeddingBagCollection, dict, list[str]]:
        """``table``: TorchRec's shard of the cold table on this rank; ``spec``: the sharder's settings."""
        col = table.local_metadata.shard_offsets[1] if table.local_metadata else 0
        tables = [
            EmbeddingBagConfig(
                num_embeddings=s.cold_rows,
                embedding_dim=table.local_cols,
                name=s.table,
                feature_names=[s.feature],
                pooling=PoolingType.SUM,
                weight_init_max=(1 / s.rows) ** 0.5,
                weight_init_min=-((1 / s.rows) ** 0.5),
            )
            for s in self.segments
        ]
        shards = {s.table: TableShard(s.hot_rows, col, s.rows, table.embedding_dim) for s in self.segments}
        collection = ColdCollection(
            self.feature, tables, spec.cache_for(shards), spec.optimizer, device=device, seed=spec.seed,
            shards=shards,
        )  # fmt: skip
        return collection, shards, [self.feature]


def cold_tables(configs: list[EmbeddingBagConfig], hot_rows: dict[str, int], owners: dict[str, int]):
    """Each owner's cold table: ``{cold_rank<r>: (Segment, ...)}``, owners in rank order, a table's
    segment in the order of ``configs``."""
    out: dict[str, list[Segment]] = {}
    for r in sorted(set(owners.values())):
        out[COLD_FEATURE.format(r)] = [
            Segment(c.name, c.feature_names[0], hot_rows.get(c.name, 0), c.num_embeddings)
            for c in configs
            if owners.get(c.name) == r and hot_rows.get(c.name, 0) < c.num_embeddings
        ]
    return {k: tuple(v) for k, v in out.items() if v}


@dataclass
class Split:
    """One batch split: hot ids (rows of the replicated block) in sample-major bag order with their
    bag offsets; the cold features; and, per cold feature, the sample-major bags its first rows pool."""

    hot_ids: torch.Tensor
    hot_offsets: torch.Tensor
    cold: KeyedJaggedTensor | None
    cold_bags: list[torch.Tensor]
    lengths: torch.Tensor  # (B * F,) sample-major bag lengths (mean pooling)

    def to(self, device: torch.device) -> Split:
        """On ``device``, copied without the host waiting (``to_device``)."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return to_device(t, device)

        cold = None
        if self.cold is not None:
            c = self.cold
            cold = KeyedJaggedTensor(keys=c.keys(), values=move(c.values()), lengths=move(c.lengths()),
                                     stride=c.stride())  # fmt: skip
        return Split(move(self.hot_ids), move(self.hot_offsets), cold, [move(b) for b in self.cold_bags],
                     move(self.lengths))  # fmt: skip


@dataclass
class _Ids:
    """A batch's ids with what both parts of the split need: each id's feature and bag."""

    ids: torch.Tensor
    feature: torch.Tensor  # per id
    bag_fm: torch.Tensor  # per id: its bag, feature-major (f * B + b)
    lengths: torch.Tensor  # (F, B)
    hot: torch.Tensor  # per id: below its table's hot rows
    on: dict  # the layout's index tensors on the ids' device


class HybridLayout:
    """Where every id of a batch goes: which rows of each feature's table are hot (and where they sit in
    the replicated block), and which cold table serves the rest (and at which of its rows)."""

    def __init__(self, configs: list[EmbeddingBagConfig], hot_rows: dict[str, int], owners: dict[str, int],
                 hot_offsets: dict[str, int]):  # fmt: skip
        if any(len(c.feature_names) != 1 for c in configs):
            raise ValueError("hybrid sharding takes one feature per table")
        self.configs = configs
        self.features = [c.feature_names[0] for c in configs]
        self.cold_tables = cold_tables(configs, hot_rows, owners)
        # what the sharder's kernels build for the cold tables (``CacheSpec.collections``)
        self.cold_collections = {name: ColdTable(name, segs) for name, segs in self.cold_tables.items()}
        self.cold_features = list(self.cold_tables)
        place = {}  # table -> (its cold table's index, its first row there)
        for v, segments in enumerate(self.cold_tables.values()):
            start = 0
            for seg in segments:
                place[seg.table] = (v, start)
                start += seg.cold_rows
        hot = [min(hot_rows.get(c.name, 0), c.num_embeddings) for c in configs]
        owner = [place.get(c.name, (-1, 0))[0] for c in configs]
        self.mean = torch.tensor([c.pooling == PoolingType.MEAN for c in configs])
        self.any_mean = bool(self.mean.any())
        self._index = {
            "hot": torch.tensor(hot, dtype=torch.int64),
            "rows": torch.tensor([c.num_embeddings for c in configs], dtype=torch.int64),
            "owner": torch.tensor(owner, dtype=torch.int64),
            # a cold id -> its row of the cold table
            "shift": torch.tensor(
                [place.get(c.name, (-1, 0))[1] - h for c, h in zip(configs, hot, strict=True)]
            ),
            "hot_at": torch.tensor([hot_offsets.get(c.name, 0) for c in configs], dtype=torch.int64),
            "mean": self.mean,
        }
        self._owner_features = [
            torch.tensor([f for f, o in enumerate(owner) if o == v], dtype=torch.int64)
            for v in range(len(self.cold_features))
        ]
        self._on: dict[torch.device, dict] = {}

    def index_on(self, dev: torch.device) -> dict:
        """The index tensors on ``dev``, copied there once."""
        if dev not in self._on:
            on = {k: t.to(dev) for k, t in self._index.items()}
            on["owner_features"] = [t.to(dev) for t in self._owner_features]
            self._on[dev] = on
        return self._on[dev]

    def _ids(self, kjt: KeyedJaggedTensor) -> _Ids:
        """``kjt``'s ids, checked against their tables."""
        index = feature_index(kjt, self.features)
        if list(kjt.keys()) != self.features:
            kjt = kjt.permute([index[f] for f in self.features])
        nf, batch = len(self.features), kjt.stride()
        dev = kjt.values().device
        on = self.index_on(dev)
        lengths = kjt.lengths().to(torch.int64).view(nf, batch)
        ids = kjt.values().to(torch.int64)
        n = len(ids)
        feature = torch.repeat_interleave(torch.arange(nf, device=dev), lengths.sum(dim=1), output_size=n)
        bad = (ids < 0) | (ids >= on["rows"][feature])
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0])
            f = int(feature[pos])
            raise ValueError(
                f"feature {self.features[f]!r}: id {int(ids[pos])} is outside its table "
                f"{self.configs[f].name!r} of {int(self._index['rows'][f])} rows"
            )
        bag_fm = torch.repeat_interleave(
            torch.arange(nf * batch, device=dev), lengths.reshape(-1), output_size=n
        )
        return _Ids(ids, feature, bag_fm, lengths, ids < on["hot"][feature], on)

    def touched_hot_rows(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """The rows of the replicated block that a (global) batch looks up, sorted."""
        x = self._ids(kjt)
        return torch.unique((x.ids + x.on["hot_at"][x.feature])[x.hot])

    def split(self, kjt: KeyedJaggedTensor) -> Split:
        """This rank's batch, split (tensors stay on the ids' device: the host, in training)."""
        x = self._ids(kjt)
        nf, batch = x.lengths.shape
        hot_sm = ((x.bag_fm % batch) * nf + x.bag_fm // batch)[x.hot]  # sample-major bags
        order = torch.argsort(hot_sm, stable=True)
        hot_ids = (x.ids + x.on["hot_at"][x.feature])[x.hot][order]
        hot_offsets = torch.zeros(nf * batch + 1, dtype=torch.int64, device=x.ids.device)
        torch.cumsum(torch.bincount(hot_sm, minlength=nf * batch), 0, out=hot_offsets[1:])
        cold, bags = self._cold(x) if self.cold_features else (None, [])
        return Split(hot_ids, hot_offsets, cold, bags, x.lengths.t().reshape(-1))

    def _cold(self, x: _Ids) -> tuple[KeyedJaggedTensor, list[torch.Tensor]]:
        """The cold features of a batch, and per cold feature the sample-major bags of its rows."""
        nf, batch = x.lengths.shape
        cold = ~x.hot
        cold_lengths = torch.bincount(x.bag_fm[cold], minlength=nf * batch).view(nf, batch)
        cold_rows = x.ids + x.on["shift"][x.feature]
        owner = x.on["owner"][x.feature]
        values, bag_lengths, bags = [], [], []
        for v, features in enumerate(x.on["owner_features"]):
            per_bag = cold_lengths.index_select(0, features).reshape(-1)  # (F_v * B,), feature-major
            mine = torch.nonzero(per_bag).squeeze(1)
            values.append(cold_rows[cold & (owner == v)])
            bag_lengths.append(per_bag[mine])
            bags.append((mine % batch) * nf + features[mine // batch])
        stride = max(1, max(len(b) for b in bags))
        padded = [torch.nn.functional.pad(lens, (0, stride - len(lens))) for lens in bag_lengths]
        kjt = KeyedJaggedTensor(
            keys=self.cold_features,
            values=torch.cat(values),
            lengths=torch.cat(padded).to(torch.int32),
            stride=stride,
        )
        return kjt, bags

    def global_cold(self, kjt: KeyedJaggedTensor, world_size: int) -> KeyedJaggedTensor:
        """The cold features of a global batch as TorchRec's input distribution hands them to their
        owners: every rank's share split as that rank splits it, rank 0's bags first."""
        parts = [self._cold(self._ids(share))[0] for share in _shares(kjt, world_size)]
        nv = len(self.cold_features)
        lengths, values = [], []
        for v in range(nv):
            for p in parts:
                per_key = p.length_per_key()
                start = sum(per_key[:v])
                lengths.append(p.lengths()[v * p.stride() : (v + 1) * p.stride()])
                values.append(p.values()[start : start + per_key[v]])
        return KeyedJaggedTensor(
            keys=self.cold_features,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            stride=sum(p.stride() for p in parts),
        )


def _shares(kjt: KeyedJaggedTensor, world_size: int) -> list[KeyedJaggedTensor]:
    """A global batch cut into the ranks' equal consecutive shares of samples (the loader's cut)."""
    nf, batch = len(kjt.keys()), kjt.stride()
    share = batch // world_size
    lengths = kjt.lengths().view(nf, batch)
    starts = torch.cumsum(kjt.lengths(), 0) - kjt.lengths()
    out = []
    for r in range(world_size):
        mine = lengths[:, r * share : (r + 1) * share]
        first = starts.view(nf, batch)[:, r * share]
        pieces = [kjt.values()[int(first[f]) : int(first[f]) + int(mine[f].sum())] for f in range(nf)]
        out.append(KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(pieces), lengths=mine.reshape(-1),
                                     stride=share))  # fmt: skip
    return out


class HybridEmbeddingBagCollection(nn.Module):
    """``EmbeddingBagCollection``'s interface over replicated hot rows and the cold tables (``cold``,
    an ``EmbeddingBagCollection`` on the ``meta`` device for ``DistributedModelParallel`` to shard
    with the cache as its kernel; ``None`` when every row is hot)."""

    def __init__(self, configs: list[EmbeddingBagConfig], layout: HybridLayout, hot: HotRows):
        super().__init__()
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"hybrid sharding takes one embedding dim for all tables, not {sorted(dims)}")
        self._configs = configs
        self.layout = layout
        object.__setattr__(self, "hot", hot)  # not a submodule: its rows are no parameters (HotRows)
        self.dim = dims.pop()
        cold = [
            EmbeddingBagConfig(
                num_embeddings=sum(s.cold_rows for s in segs),
                embedding_dim=self.dim,
                name=name,
                feature_names=[name],
                pooling=PoolingType.SUM,
            )  # fmt: skip
            for name, segs in layout.cold_tables.items()
        ]
        self.cold = EmbeddingBagCollection(cold, device=torch.device("meta")) if cold else None

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features``: this rank's batch, best on the host (``ShardedEmbeddings.sparse_input``): it is
        split there, with no host sync, and its parts go to the device."""
        if features.values().device.type != "cpu":
            features = features.to(torch.device("cpu"))
        split = self.layout.split(features)
        nf, batch = len(self.layout.features), features.stride()
        bags = nf * batch
        dev = self.hot.device
        touched = None
        if self.hot.groups and self.training and torch.is_grad_enabled():
            rows = self.hot.next_touched()
            position = torch.searchsorted(rows, split.hot_ids)
            if len(split.hot_ids) and not torch.equal(rows[position.clamp(max=len(rows) - 1)], split.hot_ids):
                raise ValueError(f"{WRONG_FEED} (its hot ids are not those of the global batch enqueued)")
            touched = (to_device(rows, dev), to_device(position, dev))
        split = split.to(dev)
        if self.hot.groups:
            pooled = self.hot.pooled(split.hot_ids, split.hot_offsets, bags, touched)
        else:
            pooled = torch.zeros(bags, self.dim, device=dev)
        if split.cold is not None:
            cold = self.cold(split.cold).values()  # (stride, cold features * D)
            for v, where in enumerate(split.cold_bags):
                block = cold[: len(where), v * self.dim : (v + 1) * self.dim]
                pooled = pooled.index_add(0, where, block)
        if self.layout.any_mean:
            mean = self.layout.index_on(dev)["mean"]
            scale = torch.where(mean.repeat(batch), 1 / split.lengths.clamp(min=1).to(pooled.dtype), 1.0)
            pooled = pooled * scale.unsqueeze(1)
        return KeyedTensor(
            keys=self.layout.features,
            length_per_key=[self.dim] * nf,
            values=pooled.view(batch, nf * self.dim),
            key_dim=1,
        )


class ColdCollection(CachedEmbeddingBagCollection):
    """The cache over one owner's cold table: ``tables`` (the cold rows of each real table, under its
    own name, so stats and checkpoints are per real table) one after the other in one group, looked up
    through the single feature ``feature`` whose ids are rows of the whole cold table."""

    def __init__(self, feature: str, tables: list[EmbeddingBagConfig], *args, **kwargs):
        super().__init__(tables, *args, **kwargs)
        if len(self.groups) != 1:
            raise ValueError(f"{feature}: its tables must share one embedding dim and pooling")
        self.feature = feature

    def prepare_batch(self, kjt: KeyedJaggedTensor, threads: int | None = None):
        """The cold rows' ids: already global rows of the one group (``threads`` not used: torch's)."""
        if kjt.values().device.type != "cpu":
            kjt = kjt.to(torch.device("cpu"))
        (g,) = self.groups
        ids = kjt.values().to(torch.int64)
        lengths = kjt.lengths().to(torch.int64)
        total = g.layout.total_rows
        bad = (ids < 0) | (ids >= total)
        if bool(bad.any()):
            raise ValueError(f"{self.feature}: row {int(ids[bad][0])} is outside its {total} rows")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return [g.prepare(ids, offsets, len(lengths), g.layout.count_unsorted_per_table(ids))]

    def keyed(self, outs: list[torch.Tensor]) -> KeyedTensor:
        return KeyedTensor(
            keys=[self.feature], length_per_key=[self.groups[0].dim], values=outs[0], key_dim=1
        )
