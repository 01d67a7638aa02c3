"""``CachedEmbeddingBagCollection``: TorchRec's ``EmbeddingBagCollection`` interface over the cache.

    ebc = CachedEmbeddingBagCollection(tables, CacheConfig(ratio=0.015), SparseOptimizer("adagrad"))
    model = torchrec.models.dlrm.DLRM(ebc, dense_in_features=13, ...)
    for batch in loader:                    # the trainer hands over the ids of future batches:
        ebc.enqueue(future_batch.sparse_features)   # `cache.lookahead` batches ahead, in order
        loss = model(batch.dense_features, batch.sparse_features) ...
        ebc.prefetch()                      # plan + load the next batch while this one computes
        loss.backward()                     # the sparse update happens here (fused); no optimizer step

Full tables and their optimizer state live on the host; only ``cache.ratio`` of each large table's rows
live on ``device``. The sparse optimizer is fused into the backward pass, as in TorchRec's fused
kernels: the embedding rows are not ``nn.Parameter``s and take no part in a dense optimizer.
Ids are expected on the host (the loader's CPU tensors); ids on another device are copied to the host.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm_cache.cache import native
from dlrm_cache.cache.batch_signature import WRONG_FEED, FeedCheck, Signature
from dlrm_cache.cache.group import GroupSettings, StepPlan, TableGroup
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.prepare import PreparedBatch
from dlrm_cache.config import CacheConfig

COUNTERS = ("lookups", "rows_touched", "rows_loaded", "rows_written", "rows_from_host", "warmup_rows")


class _FusedLookup(torch.autograd.Function):
    """Pooled embeddings of one group; its backward applies the fused sparse update."""

    @staticmethod
    def forward(ctx, trigger: torch.Tensor, group: TableGroup, plan: StepPlan) -> torch.Tensor:
        ctx.group, ctx.plan = group, plan
        return group.pool(plan, plan.rows)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ctx.group.apply_gradients(ctx.plan, grad_out)
        return None, None, None


def table_capacity(cfg: EmbeddingBagConfig, cache: CacheConfig) -> int:
    """Cache slots for a table (``CacheConfig.capacity``)."""
    return cache.capacity(cfg.name, cfg.num_embeddings)


class CachedEmbeddingBagCollection(nn.Module):
    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        cache: CacheConfig,
        optimizer: SparseOptimizer,
        device: torch.device | str | None = None,
        row_frequencies: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        shards: dict[str, TableShard] | None = None,
    ):
        """``row_frequencies``: train counts per row for the tables that have them (warm-up and the
        ``freq`` / ``lookahead`` priorities). Without them, ids are taken to be ranked by frequency (as
        ``dlrm-preprocess`` writes them): id 0 is the hottest row. ``shards``: for tables that are
        shards of larger ones, where each sits in its full table (see ``TableShard``)."""
        super().__init__()
        _check_tables(tables, cache)
        self._configs = tables
        self.cache_config = cache
        self.optimizer = optimizer
        self.device = torch.device(device or "cpu")
        freqs = row_frequencies or {}
        unknown = set(freqs) - {t.name for t in tables}
        if unknown:
            raise ValueError(f"row_frequencies names unknown tables: {sorted(unknown)}")
        planner = native.resolve(cache.planner)
        self.threaded = cache.bookkeeping_thread(self.device.type)  # see _submit
        native_copies = {"auto": None, "native": True, "torch": False}[cache.row_copies]
        by_kind: dict[tuple[int, PoolingType], list[EmbeddingBagConfig]] = {}
        for t in tables:
            by_kind.setdefault((t.embedding_dim, t.pooling), []).append(t)
        self.groups = [
            TableGroup(
                cfgs,
                GroupSettings(
                    [table_capacity(c, cache) for c in cfgs],
                    cache.policy,
                    optimizer,
                    self.device,
                    host_kind=cache.host,
                    mmap_dir=cache.mmap_dir,
                    frequencies=[freqs.get(c.name) for c in cfgs],
                    warmup_ratio=cache.warmup_ratio,
                    seed=seed,
                    shards=[shards.get(c.name, TableShard.whole(c)) for c in cfgs] if shards else None,
                    planner=planner,
                    native_copies=native_copies,
                ),
            )
            for cfgs in by_kind.values()
        ]
        self._feature_names = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._group_order = [f for g in self.groups for f in g.layout.features]
        self._group_dims = [g.dim for g in self.groups for _ in g.layout.features]
        self._queue: deque[tuple[Signature, Future]] = deque()  # (signature, prepared batch per group)
        self._feed = FeedCheck()  # the signatures of batches on a device, compared there
        self._planned: Future | None = None  # the plan of the queue's head, made by prefetch()
        self._worker: ThreadPoolExecutor | None = None  # the bookkeeping thread
        self._preparers: ThreadPoolExecutor | None = None  # threads preparing enqueued batches
        self._step = 0

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    # ---------------------------------------------------------------- the lookahead queue
    def enqueue(self, features: KeyedJaggedTensor) -> None:
        """Hand over a future training batch; ``forward`` must then receive the batches in this order.
        Its ids are prepared on a preparing thread and registered on the bookkeeping thread (inline on
        the CPU; see ``_submit``)."""
        pin = self.device.type == "cuda" and features.values().device.type == "cpu"  # compared on the device
        prepared = self._submit_prepare(features)
        self._queue.append((Signature.of(features, pin), self._submit(self._register_future, prepared)))

    def is_enqueued(self, features: KeyedJaggedTensor) -> bool:
        """Whether this batch is waiting in the lookahead queue."""
        signature = Signature.of(features)
        return any(s.matches(signature) for s, _ in self._queue)

    def prefetch(self) -> None:
        """Plan the next enqueued batch and load its missing rows, on the bookkeeping thread while the
        current batch computes (on the CPU, ``forward`` has done so already where that batch was
        enqueued by then). Rows the in-flight batch needs are never evicted, and rows it updates on
        the host (overflow) are read from the host at the next forward, after that update: nothing
        is read stale."""
        if self._planned is not None or not self._queue:
            return
        self._planned = self._submit_plan(self._queue[0][1])

    def _submit_prepare(self, features: KeyedJaggedTensor) -> Future:
        """A future batch's ids made ready (``prepare_batch``): with a bookkeeping thread, on one of
        ``cache.prepare_threads`` threads, each batch on one thread (batches are independent: the
        bookkeeping thread takes them in order); inline, right here on every thread."""
        if not self.threaded:
            return self._run_inline(self.prepare_batch, features)
        if self._preparers is None:
            self._preparers = self._pool(self.cache_config.prepare_threads, "dlrm-cache-prepare")
        return self._preparers.submit(self.prepare_batch, features, 1)

    def _register_future(self, prepared: Future) -> list[PreparedBatch]:
        """Bookkeeping thread, in enqueue order: a prepared batch's rows registered as future uses."""
        batches = prepared.result()
        for g, p in zip(self.groups, batches, strict=True):
            g.register_future(p)
        return batches

    def _submit_plan(self, prepared: Future) -> Future:
        self._step += 1
        step = self._step
        # Read here: the batch in flight (`_inflight`) belongs to this thread.
        inflight = [(g.pin_floor(step), g.inflight_host_rows()) for g in self.groups]

        def plan() -> list[StepPlan]:
            batches = prepared.result()
            return [g.plan(p, step, *f) for g, p, f in zip(self.groups, batches, inflight, strict=True)]

        return self._submit(plan)

    def _submit(self, fn, *args) -> Future:
        """Run ``fn`` on the bookkeeping thread, after everything submitted before it (in order).

        Inline (``cache.bookkeeping``, the CPU's default) it runs right here instead: on the CPU the
        step's own compute already uses every core (intra-op threads), and a second busy thread slows
        both down (``scripts/bench_cache_step.py``; docs/cache.md)."""
        if not self.threaded:
            return self._run_inline(fn, *args)
        if self._worker is None:
            self._worker = self._pool(1, "dlrm-cache")
        return self._worker.submit(fn, *args)

    @staticmethod
    def _run_inline(fn, *args) -> Future:
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as e:  # raised where the result is read, as from the thread
            done.set_exception(e)
        return done

    def _pool(self, threads: int, name: str) -> ThreadPoolExecutor:
        # On CUDA the threads work on this collection's device (else they would open a context on
        # GPU 0, in every rank's process).
        cuda = self.device.type == "cuda"
        return ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix=name,
            initializer=torch.cuda.set_device if cuda else None,
            initargs=(self.device,) if cuda else (),
        )

    def _drain(self) -> None:
        """Wait until the bookkeeping thread has done everything submitted so far, and raise what the
        plan made ahead (``prefetch``) raised: a failed prefetch surfaces here, before a checkpoint
        (``flush``) or an evaluation could work on a half-applied plan, not only at the next step;
        and raise a wrong batch that a forward on a device found (``batch_signature``)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()
        self._feed.raise_if_wrong()
        if self._planned is not None and self._planned.done() and self._planned.exception() is not None:
            raise self._planned.exception()

    # ---------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not (self.training and torch.is_grad_enabled()):
            self._drain()
            prepared = self.prepare_batch(features)
            outs = [g.lookup_readonly(p) for g, p in zip(self.groups, prepared, strict=True)]
            return self.keyed(outs)
        if self._queue:
            signature, prepared = self._queue[0]
            got = Signature.of(features)
            if got.sums.device.type != "cpu":
                self._feed.compare(got, signature)  # no host sync: the verdict is read at the next wait
            elif not got.matches(signature):
                raise ValueError(WRONG_FEED)
            planned = self._planned or self._submit_plan(prepared)
            self._queue.popleft()
        else:
            done: Future = Future()
            done.set_result(self.prepare_batch(features))
            planned = self._submit_plan(done)
        self._planned = None
        plans = planned.result()
        for g, plan in zip(self.groups, plans, strict=True):
            g.begin_step(plan)
        if not self.threaded:
            # The plan runs inline: the next batch's is made here, once this batch's rows
            # are gathered. It is the plan prefetch() would make between forward and backward (the
            # bookkeeping does not change in between), made while the processor's caches hold
            # nothing the step still needs; made later, its scans and row copies pushed the step's
            # activations out of them and the backward pass paid for it.
            self.prefetch()
        trigger = torch.empty(0, requires_grad=True)
        outs = [_FusedLookup.apply(trigger, g, plan) for g, plan in zip(self.groups, plans, strict=True)]
        return self.keyed(outs)

    # Two hooks for collections over another feature layout (``hybrid.ColdCollection``): how a batch's
    # ids become each group's prepared ids, and how the groups' pooled outputs become the output.
    def keyed(self, outs: list[torch.Tensor]) -> KeyedTensor:
        """The groups' pooled outputs (B, group features x dim each) as the collection's output."""
        values = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self._group_order != self._feature_names:
            per_feature = dict(zip(self._group_order, values.split(self._group_dims, dim=1), strict=True))
            values = torch.cat([per_feature[f] for f in self._feature_names], dim=1)
        return KeyedTensor(keys=self._feature_names, length_per_key=self._dims, values=values, key_dim=1)

    def prepare_batch(self, kjt: KeyedJaggedTensor, threads: int | None = None) -> list[PreparedBatch]:
        """Global row ids per group, their unique set and bag offsets, in host memory; ``threads``: the
        threads the C++ preparation spreads a group's tables over (None: torch's intra-op threads)."""
        if kjt.values().device.type != "cpu":
            kjt = kjt.to(torch.device("cpu"))
        index = feature_index(kjt, self._feature_names)
        lengths = kjt.lengths().view(len(index), kjt.stride())
        starts = [0, *torch.tensor(kjt.length_per_key()).cumsum(0).tolist()]
        prepared = []
        for g in self.groups:
            features = [index[f] for f in g.layout.features]
            lens = lengths[features].to(torch.int64)  # (F, B)
            prepared.append(g.prepare_features(kjt.values(), [starts[i] for i in features], lens, threads))
        return prepared

    # ---------------------------------------------------------------- state
    def close(self) -> None:
        """Stop the bookkeeping thread (after what it was given) and drop the host tier's scratch files
        (``cache.host=mmap``); raises nothing of a failed plan (the step or flush that needed it did)."""
        for pool in (self._preparers, self._worker):  # the bookkeeping thread waits on the preparers
            if pool is not None:
                pool.shutdown()
        self._preparers = self._worker = None
        for g in self.groups:
            g.close()

    def set_learning_rate(self, lr: float) -> None:
        """The sparse optimizer's learning rate from the next update on (for LR schedules). The
        optimizer runs in backward, on the caller's thread: no need to wait for the bookkeeping one."""
        if lr == self.optimizer.lr:
            return
        self.optimizer = replace(self.optimizer, lr=lr)
        for g in self.groups:
            g.set_learning_rate(lr)

    def flush(self) -> None:
        self._drain()
        for g in self.groups:
            g.flush()

    def stats(self) -> dict:
        """Cache counters, per table and in total, as plain numbers (reading them never syncs with the
        device; it waits for the bookkeeping thread)."""
        self._drain()
        tables, totals = {}, dict.fromkeys(COUNTERS, 0)
        eval_lookups = eval_host = 0
        bytes_h2d = bytes_d2h = disk_read = disk_written = 0
        for g in self.groups:
            if g.host is not None:
                disk_read += g.host.read_bytes
                disk_written += g.host.write_bytes
            s = g.stats
            row_bytes = g.width * 4
            for t, cfg in enumerate(g.configs):
                entry = {
                    "rows": g.layout.rows[t],
                    "capacity": g.layout.capacities[t],
                    "lookups": int(s.lookups[t]),
                    "rows_touched": int(s.touched[t]),
                    "rows_loaded": int(s.loaded[t]),
                    "rows_written": int(s.written[t] + s.written_by_update[t]),
                    "rows_from_host": int(s.overflow[t]),
                    "warmup_rows": int(s.warmup[t]),
                }
                entry["hit_rate_unique"] = _hit_rate(entry["rows_loaded"], entry["rows_touched"])
                tables[cfg.name] = entry
                for k in totals:
                    totals[k] += entry[k]
                bytes_h2d += (entry["rows_loaded"] + entry["warmup_rows"]) * row_bytes
                bytes_d2h += entry["rows_written"] * row_bytes
            eval_lookups += int(s.eval_lookups.sum())
            eval_host += int(s.eval_host_rows.sum())
        return {
            "policy": self.cache_config.policy,
            "ratio": self.cache_config.ratio,
            **totals,
            "hit_rate_unique": _hit_rate(totals["rows_loaded"], totals["rows_touched"]),
            "bytes_h2d": bytes_h2d,
            "bytes_d2h": bytes_d2h,
            # disk I/O of a mapped host tier (cache.host=mmap) while training
            "disk_read_bytes": disk_read,
            "disk_write_bytes": disk_written,
            **_disk_per_row(disk_read, disk_written, totals),
            "bookkeeping_s": sum(g.stats.bookkeeping_s for g in self.groups),
            "eval": {"lookups": eval_lookups, "rows_from_host": eval_host},
            "tables": tables,
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Full, flushed tables and optimizer state in the host layout; weights under TorchRec's
        ``embedding_bags.<table>.weight`` keys."""
        self.flush()
        for g in self.groups:
            for t, cfg in enumerate(g.configs):
                rows = g.table_rows(t)
                destination[f"{prefix}embedding_bags.{cfg.name}.weight"] = rows[:, : g.dim].clone()
                destination[f"{prefix}embedding_bags.{cfg.name}.optimizer_state"] = rows[:, g.dim :].clone()
        destination[f"{prefix}optimizer_step"] = torch.tensor(self.optimizer_step)

    @property
    def optimizer_step(self) -> int:
        """Updates applied so far (a batch planned ahead by prefetch() has not been trained on yet)."""
        return self._step - (1 if self._planned is not None else 0)

    def restored(self, optimizer_step: int) -> None:
        """After the tables' rows were written in place (``TableGroup.write_table_rows``): continue from
        ``optimizer_step`` updates, the caches dropped and warmed up again."""
        self._step = optimizer_step
        self._planned = None
        self._drain()
        queued = [prepared.result() for _, prepared in self._queue]
        for i, g in enumerate(self.groups):
            g.rebuild([p[i] for p in queued])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        expected = [f"{prefix}optimizer_step"]
        for g in self.groups:
            for t, cfg in enumerate(g.configs):
                w_key = f"{prefix}embedding_bags.{cfg.name}.weight"
                s_key = f"{prefix}embedding_bags.{cfg.name}.optimizer_state"
                expected += [w_key, s_key]
                if w_key not in state_dict or s_key not in state_dict:
                    missing_keys.extend(k for k in (w_key, s_key) if k not in state_dict)
                    continue
                rows = torch.cat([state_dict[w_key], state_dict[s_key]], dim=1)
                expected_shape = (g.layout.rows[t], g.width)
                if tuple(rows.shape) != expected_shape:
                    error_msgs.append(
                        f"{w_key}: weight+state of shape {tuple(rows.shape)}, expected {expected_shape}"
                    )
                    continue
                g.write_table_rows(t, 0, rows)
        step = self._step
        if f"{prefix}optimizer_step" in state_dict:
            step = int(state_dict[f"{prefix}optimizer_step"])
        else:
            missing_keys.append(f"{prefix}optimizer_step")
        if strict:
            ours = set(expected)
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)
        self.restored(step)


def feature_index(kjt: KeyedJaggedTensor, features: list[str]) -> dict[str, int]:
    """The position of each of ``kjt``'s keys, once it is checked to have every one of ``features``."""
    keys = kjt.keys()
    index = {k: i for i, k in enumerate(keys)}
    missing = [f for f in features if f not in index]
    if missing:
        raise ValueError(f"the batch has no feature {missing[0]!r} (it has {keys})")
    return index


def merge_stats(parts: list[dict], cache: CacheConfig) -> dict:
    """The ``stats()`` of several caches (of one model's shards; none where every row is replicated)
    as one: counters summed, the shards of one table together (``shards`` counts them)."""
    tables: dict[str, dict] = {}
    for s in parts:
        for name, t in s["tables"].items():
            empty = {"rows": t["rows"], "capacity": t["capacity"], "shards": 0, **dict.fromkeys(COUNTERS, 0)}
            mine = tables.setdefault(name, empty)
            mine["shards"] += 1
            for c in COUNTERS:
                mine[c] += t[c]
    for t in tables.values():
        t["hit_rate_unique"] = _hit_rate(t["rows_loaded"], t["rows_touched"])
    summed = (*COUNTERS, "bytes_h2d", "bytes_d2h", "disk_read_bytes", "disk_write_bytes", "bookkeeping_s")
    totals = {c: sum(s[c] for s in parts) for c in summed}
    return {
        "policy": cache.policy,
        "ratio": cache.ratio,
        **totals,
        **_disk_per_row(totals["disk_read_bytes"], totals["disk_write_bytes"], totals),
        "hit_rate_unique": _hit_rate(totals["rows_loaded"], totals["rows_touched"]),
        "eval": {k: sum(s["eval"][k] for s in parts) for k in ("lookups", "rows_from_host")},
        "tables": tables,
    }


def _disk_per_row(read: int, written: int, totals: dict) -> dict:
    return {
        "disk_read_bytes_per_row_loaded": read / max(1, totals["rows_loaded"]),
        "disk_write_bytes_per_row_written": written / max(1, totals["rows_written"]),
    }


def _hit_rate(loaded: int, touched: int) -> float:
    return 1.0 - loaded / touched if touched else 1.0


def _check_tables(tables: list[EmbeddingBagConfig], cache: CacheConfig) -> None:
    if not tables:
        raise ValueError("no embedding tables given")
    names, features = set(), set()
    for t in tables:
        if t.name in names:
            raise ValueError(f"Duplicate table name {t.name}")
        names.add(t.name)
        if t.num_embeddings < 1 or t.embedding_dim < 1:
            raise ValueError(f"table {t.name}: num_embeddings and embedding_dim must be >= 1")
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {t.name}: pooling {t.pooling} is not supported (SUM or MEAN)")
        for f in t.feature_names:
            if f in features:
                raise ValueError(f"feature {f} is in two tables")
            features.add(f)
    unknown = set(cache.table_ratios) - names
    if unknown:
        raise ValueError(f"cache.table_ratios names unknown tables: {sorted(unknown)}")
