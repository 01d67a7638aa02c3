"""``dlrm-preprocess``: Criteo TSV -> Parquet splits, id frequencies, ids re-numbered by frequency.

Streaming, in bounded memory (one chunk of ``preprocess.chunk_mb`` of TSV at a time):

0. (``split=fraction`` only) count the inputs' lines, to place the split boundaries.
1. Parse every input once, validate every field, transform integers with ``log1p(max(x, 0))`` as
   float32 (the DLRM reference's transform; missing -> 0), count categorical values over the
   **train** lines only, and spill the parsed rows to an uncompressed Arrow IPC file in the temporary
   folder (reading it back costs a fraction of parsing TSV again), a batch per chunk.
2. Rank each feature's values by train count (``vocab.Vocabulary``; out of core
   ``spilled_vocab.SpilledVocabulary``): the hottest value gets id 0.
3. Read the spilled rows, re-number ids (values rare in train or unseen there share the "rare" id),
   and write ``{train,val,test}/part-*.parquet`` with one fixed schema, parts side by side
   (``write_pass``).
4. Write ``vocab/cat_*.parquet``, the skew report (``stats/skew.json``, ``stats/skew.png``) and
   ``metadata.json``.

With ``vocab_from`` (another dataset's folder) steps 1-2 count nothing: that dataset's vocabularies
(and its ``max_ind_range``) encode the inputs, so new data gets the ids a model was trained on;
``all_into`` puts every line into one split.

Everything is written into a temporary folder beside ``output_dir`` and renamed into place at the
end, so a failure leaves nothing half-written. A finished output with the same inputs and config is
left alone (a no-op) unless ``overwrite=true``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dlrm_cache.config import GB, PreprocessOptions, PreprocessRunConfig
from dlrm_cache.criteo import CAT_COLUMNS, DENSE_TRANSFORM, INT_COLUMNS
from dlrm_cache.data import fixed_bags
from dlrm_cache.data.criteo_tsv import (
    BadLines,
    count_newlines,
    detect_columns,
    open_input,
    read_chunks,
    unreadable,
)
from dlrm_cache.data.held_lookups import HeldLookups
from dlrm_cache.data.memory_budget import MemoryBudget, map_large_allocations, memory_budget
from dlrm_cache.data.multi_hot import BagLookup, MultiHot, expanded
from dlrm_cache.data.saved_vocab import SavedVocabularies, saved_vocabularies, write_vocabulary
from dlrm_cache.data.spilled_counts import SpilledCounter
from dlrm_cache.data.spilled_vocab import SpilledVocabulary
from dlrm_cache.data.vocab import LOOKUP_BYTES, Vocabulary
from dlrm_cache.data.write_pass import SPLITS, BatchIndex, WritePass, plan, read_ahead
from dlrm_cache.files import file_crc32, folder_beside, naming, refuse_foreign, remove_leftovers, swap_in

SCHEMA_VERSION = 1
OUTPUTS = {*SPLITS, "vocab", "stats", "metadata.json"}  # what a dataset folder holds
SKEW_POINTS = [0.001, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]  # shares of rows
log = logging.getLogger(__name__)


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Paths and globs -> files, each glob's matches in natural order (day_2 before day_10)."""
    files: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern), key=_natural_key)
            if not matches:
                raise FileNotFoundError(f"input={pattern!r} matches no file")
            files += [Path(m) for m in matches]
        else:
            path = Path(pattern)
            if path.is_dir():
                raise IsADirectoryError(
                    f"input {pattern}: a folder, not a Criteo TSV file (name its files, or a glob: "
                    f"{path}/day_*)"
                )
            if not path.is_file():
                raise FileNotFoundError(f"input {pattern}: no such file")
            files.append(path)
    return files


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def count_lines(path: Path, stop: threading.Event | None = None) -> int:
    """The lines of ``path``, the last one with or without its newline; -1 once ``stop`` is set."""
    raw, stream = open_input(path)
    buf = bytearray(1 << 24)
    lines, last = 0, ord("\n")
    try:
        while got := stream.readinto(buf):
            if stop is not None and stop.is_set():
                return -1
            lines += count_newlines(buf, 0, got)
            last = buf[got - 1]
    except (OSError, pa.ArrowInvalid) as e:
        raise unreadable(path, e) from None
    finally:
        raw.close()
    return lines + (last != ord("\n"))


def split_bounds(
    cfg: PreprocessRunConfig, files: list[Path], stop: threading.Event
) -> tuple[list[int], Future]:
    """Per file, the last line (1-based, inclusive) of train, and (a future of) the last line of val;
    test is the rest. The parse pass needs the train ends (it counts train values only), the write
    pass the val ends: with ``split=last_file`` the last file's line count, which places its val/test
    boundary, runs on a thread of its own beside the parse pass (``stop`` ends it early) instead of
    before it. With ``split=fraction`` every file is counted first."""
    big = np.iinfo(np.int64).max
    if cfg.all_into is not None:  # every line into one split: train ends, then val ends, after it
        train_end, val_end = {"train": (big, big), "val": (0, big), "test": (0, 0)}[cfg.all_into]
        val_ends: Future = Future()
        val_ends.set_result([val_end] * len(files))
        return [train_end] * len(files), val_ends
    if cfg.dataset.split == "last_file":
        if len(files) < 2:
            raise ValueError(
                "dataset.split=last_file needs at least two inputs (train days, then the last day)"
            )
        counting = ThreadPoolExecutor(1, thread_name_prefix="dlrm-preprocess-lines")
        val_ends = counting.submit(lambda: [big] * (len(files) - 1) + [count_lines(files[-1], stop) // 2])
        counting.shutdown(wait=False)  # its thread ends with its one task
        return [big] * (len(files) - 1) + [0], val_ends
    counts = [count_lines(f) for f in files]
    total = sum(counts)
    train_end = int(total * cfg.dataset.train_fraction)
    val_end = train_end + (total - train_end) // 2
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    val_ends: Future = Future()
    val_ends.set_result([val_end - start for start in starts])
    return [train_end - start for start in starts], val_ends


def _fingerprint(cfg: PreprocessRunConfig, files: list[Path], source: SavedVocabularies | None) -> dict:
    return {
        "dataset": asdict(cfg.dataset),
        "vocab_from": source.identity if source else None,
        "all_into": cfg.all_into,
        # How bags are stored (fixed_bags): a multi-hot dataset written before, as list columns, is
        # not this run's output.
        "bag_format": None if cfg.preprocess.multi_hot_sizes is None else "fixed_size_binary",
        "inputs": [
            {"path": str(f.resolve()), "size": f.stat().st_size, "mtime": f.stat().st_mtime} for f in files
        ],
        "preprocess": {
            k: v
            for k, v in asdict(cfg.preprocess).items()
            if k not in ("progress", "workers", "parser", "memory_gb")  # the same output whatever they are
        },
    }


def preprocess(cfg: PreprocessRunConfig) -> Path:
    """Run the pipeline; returns the output folder. Raises ``CriteoFormatError`` (bad lines),
    ``FileNotFoundError`` (missing input), ``FileExistsError`` (output holds something else)."""
    files = resolve_inputs(cfg.input)
    out = Path(cfg.output_dir)
    for f in files:
        if f.resolve().is_relative_to(out.resolve()):
            raise ValueError(
                f"output_dir {out} holds the input {f}: choose an output_dir apart from the inputs"
            )
    source = _vocab_source(cfg, out)
    if source is not None:  # the vocabularies' hashing and bags, whatever was given
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, max_ind_range=source.max_ind_range,
                                              **source.multi_hot))  # fmt: skip
    fingerprint = _fingerprint(cfg, files, source)
    remove_leftovers(out)  # what killed runs left beside it, also when this run has nothing to do
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output_dir {out} is a file, not a folder")
        meta = _our_metadata(out)
        if meta is not None and _same_run(meta, fingerprint) and not cfg.overwrite:
            log.info("%s already holds this dataset; nothing to do (overwrite=true redoes it)", out)
            return out
        if not cfg.overwrite and any(out.iterdir()):
            what = "a different dataset" if meta is not None else "files that are not a preprocessed dataset"
            raise FileExistsError(f"output_dir {out} already holds {what}; pass overwrite=true to replace it")
        refuse_foreign(
            out,
            OUTPUTS if meta is not None else (),
            f"output_dir {out}",
            "dlrm-preprocess",
            "; overwrite=true replaces only a preprocessed dataset: move them or choose another output_dir",
        )
    layouts = [detect_columns(f) for f in files]
    labeled = [cols[0] == "label" for cols in layouts]
    if any(labeled) and not all(labeled):
        with_labels, without = files[labeled.index(True)], files[labeled.index(False)]
        raise ValueError(
            f"input {with_labels} has labels (40 fields) but {without} has none (39 fields): "
            "preprocess labelled and unlabelled files apart"
        )
    if source is not None:  # vocab_from's vocabularies checked once nothing is left to refuse (read
        source.check()  # again, a feature at a time, once the inputs are parsed)
    opts = cfg.preprocess
    tmp = folder_beside(out)
    stop = threading.Event()  # set on a failure: a line count still running gives up
    try:
        train_ends, val_ends = split_bounds(cfg, files, stop)
        spills = [tmp / f"_parsed-{n}.arrow" for n in range(len(files))]
        workers = min(opts.workers or os.cpu_count() or 1, len(files))
        budget = memory_budget(opts, workers)
        counts_dir = tmp / "_counts"
        counts_dir.mkdir()
        jobs = [
            _ParseJob(
                f,
                cols,
                train_end,
                spill,
                opts.chunk_mb << 20,
                opts.on_bad_lines,
                opts.parser,
                opts.max_ind_range,
                counts_dir,
                budget.values_per_feature,
                count=source is None,
            )  # fmt: skip
            for f, cols, train_end, spill in zip(files, layouts, train_ends, spills, strict=True)
        ]
        counters, bad, index = _parse_all(jobs, workers, opts.progress)
        pa.default_memory_pool().release_unused()  # the parse's buffers, back to the system
        multi = MultiHot.of(opts)
        made = (
            source.read_each()
            if source
            else _fit(counters, opts.min_count, budget, counts_dir, opts.progress)
        )
        if multi is not None and source is None:  # ranked again by the expanded ids' counts
            made = (expanded(vocab.in_memory(), j, multi) for j, vocab in enumerate(made))
        del counters  # held by the generator alone, which drops each once it is ranked
        held = HeldLookups(tmp / "_lookups", budget.total - budget.write_fixed)
        coverage = _vocabularies(made, tmp / "vocab", held, multi)
        counts_dir.rmdir()
        id_type = pa.int32() if max(held.sizes) < 2**31 else pa.int64()
        ids = (
            [pa.field(c, id_type) for c in CAT_COLUMNS]
            if multi is None
            else [pa.field(c, fixed_bags.bag_type(id_type, n), nullable=False)
                  for c, n in zip(CAT_COLUMNS, multi.sizes, strict=True)]
        )  # fmt: skip
        schema = pa.schema([("label", pa.int8()), *((c, pa.float32()) for c in INT_COLUMNS), *ids])
        # Dictionary pages for the columns with few values (dense values, small vocabularies: a row's
        # bag is one of as many as its vocabulary's ids) where they fit in one (1 MiB); ids of a
        # vocabulary of 2^16 or more are written plain: smaller files, and less work, than a dictionary
        # of up to a row group's worth of values.
        dictionary = [c for c in schema.names if c not in CAT_COLUMNS]
        dictionary += [
            c
            for c, size in zip(CAT_COLUMNS, held.sizes, strict=True)
            if size < 1 << 16 and size * schema.field(c).type.byte_width <= 1 << 20
        ]
        bounds = list(zip(train_ends, val_ends.result(), strict=True))
        parts = plan(spills, index, bounds, opts.max_file_rows)
        rows = {s: sum(p.rows for p in parts if p.split == s) for s in SPLITS}
        # The skew report and its plot (~0.5 s of matplotlib, whatever the input) are written
        # meanwhile, on a thread of their own; leaving the block waits for it, also on a failure,
        # before the temporary folder it writes into is removed.
        skew = coverage.report()
        with ThreadPoolExecutor(1, thread_name_prefix="dlrm-preprocess-stats") as stats:
            plotted = stats.submit(_write_skew, tmp / "stats", skew, coverage.samples)
            writing = WritePass(spills, held, schema, dictionary, opts.row_group_rows, budget.write_threads)
            writing.run(parts, tmp, opts.progress)
            plotted.result()
        held.remove()
        metadata = {
            "schema_version": SCHEMA_VERSION,
            **fingerprint,
            "dataset_name": cfg.dataset.name,
            "labeled": labeled,
            "rows": rows,
            "split_lines": [
                {"file": str(f), "train_last_line": min(t, 2**62), "val_last_line": min(v, 2**62)}
                for f, (t, v) in zip(files, bounds, strict=True)
            ],
            "vocab_sizes": dict(zip(CAT_COLUMNS, held.sizes, strict=True)),
            "multi_hot_sizes": None if multi is None else dict(zip(CAT_COLUMNS, multi.sizes, strict=True)),
            "rare_ids": dict(zip(CAT_COLUMNS, held.rare_ids, strict=True)),
            "dense_transform": DENSE_TRANSFORM,
            "max_ind_range": opts.max_ind_range,
            "skipped_lines": {"count": bad.count, "reasons": bad.reasons, "first": bad.first},
            "skew": skew,
        }
        metadata.update(_identities(tmp, metadata, source))
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        if bad.count:
            log.warning("skipped %d bad lines (first: %s)", bad.count, ", ".join(bad.first))
        swap_in(tmp, out)
    except BaseException:
        stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _identities(folder: Path, metadata: dict, source: SavedVocabularies | None) -> dict:
    """What identifies the dataset by its content, wherever it lies: ``vocab_id``, its encoding (a hash
    of its vocabularies; ``vocab_from``'s own where it encodes with those), and ``dataset_id``, its data
    (that, its inputs, options and split). A run records both; predictions and resumes check them."""
    vocab = source.vocab_id if source is not None and source.vocab_id else None
    if vocab is None:
        digest = hashlib.sha256()
        for c in CAT_COLUMNS:
            digest.update(file_crc32(folder / "vocab" / f"{c}.parquet").to_bytes(4, "little"))
        vocab = digest.hexdigest()[:16]
    content = {k: metadata[k] for k in ("inputs", "dataset", "preprocess", "all_into", "rows", "split_lines")}
    data = hashlib.sha256(json.dumps({"vocab_id": vocab, **content}, sort_keys=True).encode()).hexdigest()
    return {"vocab_id": vocab, "dataset_id": data[:16]}


def _vocab_source(cfg: PreprocessRunConfig, out: Path) -> SavedVocabularies | None:
    """The vocabularies of ``vocab_from``, checked against the run's settings; None without it."""
    if cfg.vocab_from is None:
        return None
    root = Path(cfg.vocab_from)
    if out.resolve().is_relative_to(root.resolve()) or root.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"vocab_from={root} and output_dir={out} overlap: write the encoded data elsewhere")
    source = saved_vocabularies(root)
    given = cfg.preprocess.max_ind_range
    if given and given != source.max_ind_range:
        raise ValueError(
            f"preprocess.max_ind_range={given}, but vocab_from={root} was made with "
            f"max_ind_range={source.max_ind_range}: its ids mean other values (leave the setting out)"
        )
    for key, made in source.multi_hot.items():
        given, default = getattr(cfg.preprocess, key), getattr(PreprocessOptions(), key)
        if given != default and given != made:
            raise ValueError(
                f"preprocess.{key}={given}, but vocab_from={root} was made with {key}={made}: its ids "
                "expand to other bags (leave the setting out)"
            )
    return source


def _same_run(meta: dict, fingerprint: dict) -> bool:
    """Whether ``meta`` was written for this fingerprint; an option a dataset's version did not have
    yet counts as its default (what that version did)."""
    if meta.get("schema_version") != SCHEMA_VERSION:
        return False
    defaults = asdict(PreprocessOptions())
    made = {**meta, "preprocess": {**defaults, **meta.get("preprocess", {})}}
    wanted = {**fingerprint, "preprocess": {**defaults, **fingerprint["preprocess"]}}
    return all(made.get(k) == v for k, v in wanted.items())


def _our_metadata(out: Path) -> dict | None:
    """``out``'s metadata when it is a dataset this command wrote, else None."""
    try:
        meta = json.loads((out / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "schema_version" in meta else None


@dataclass
class _ParseJob:
    """Parse one input: spill its rows (with their line numbers) to ``spill``, count its train values."""

    path: Path
    columns: list[str]
    train_end: int  # its last train line
    spill: Path
    chunk_bytes: int
    on_bad_lines: str
    parser: str
    max_ind_range: int
    counts_dir: Path  # where counters spill
    values_per_feature: int  # distinct values a counter holds before it spills
    count: bool = True  # False: the vocabularies exist already (vocab_from); nothing to count

    def run(self, on_progress=None) -> tuple[list[SpilledCounter], BadLines, list[BatchIndex]]:
        bad = BadLines()
        index = []
        counters = [SpilledCounter(self.counts_dir, c, self.values_per_feature) for c in CAT_COLUMNS]
        with (
            naming(self.spill),
            pa.OSFile(str(self.spill), "wb") as sink,
            pa.ipc.new_file(sink, _PARSED) as spill,
            ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="dlrm-preprocess-count") as pool,
        ):
            chunks = read_chunks(
                self.path, self.columns, self.chunk_bytes, self.on_bad_lines, bad, on_progress, self.parser
            )
            for chunk in read_ahead(chunks):
                if self.max_ind_range:  # the reference's hashing; the empty value (-1) stays apart
                    np.remainder(chunk.cats, self.max_ind_range, out=chunk.cats, where=chunk.cats >= 0)
                counted = []
                if self.count:
                    # Columns counted side by side (the counters release the GIL), while the rows are spilled.
                    train = chunk.lines <= self.train_end
                    cats = chunk.cats if train.all() else chunk.cats[train]
                    counted = [pool.submit(c.add, cats[:, j]) for j, c in enumerate(counters)]
                if len(chunk.lines):
                    spill.write_table(_parsed_table(chunk))
                    index.append(BatchIndex(len(chunk.lines), int(chunk.lines[0]), int(chunk.lines[-1])))
                for done in counted:
                    done.result()
        return counters, bad, index


def _parse_all(
    jobs: list[_ParseJob], workers: int, progress: bool
) -> tuple[list[SpilledCounter], BadLines, list[list[BatchIndex]]]:
    """Run the parse jobs, one input file per process when there are several, and merge their counts
    as each finishes, in input order (so the result does not depend on the scheduling, and the counts
    of finished files wait merged, within their counters' limits, not one set per file); each
    spill's batches."""
    total = sum(j.path.stat().st_size for j in jobs)
    counters: list[SpilledCounter] | None = None
    bad = BadLines()
    index: list[list[BatchIndex]] = []

    def take(result: tuple[list[SpilledCounter], BadLines, list[BatchIndex]]) -> None:
        nonlocal counters
        more, more_bad, more_index = result
        if counters is None:
            counters = more
        else:
            for c, m in zip(counters, more, strict=True):
                c.merge(m)
        bad.extend(more_bad)
        index.append(more_index)

    with _progress("parse", total, progress) as bar:
        if len(jobs) == 1 or workers == 1:
            for job in jobs:
                take(job.run(bar.at(job.path)))
        else:
            ctx = multiprocessing.get_context("spawn")  # pyarrow's thread pools do not survive fork
            parent = os.getpid()
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)),
                mp_context=ctx,
                initializer=_start_parse_process,
                initargs=(parent,),
            ) as pool:
                try:
                    futures = [pool.submit(job.run) for job in jobs]
                    for i, job in enumerate(jobs):
                        take(futures[i].result())
                        futures[i] = None  # its counts are merged: not held twice
                        bar.at(job.path)(job.path.stat().st_size)
                except BaseException:  # a failure, Ctrl-C, SIGTERM: stop the other parses now
                    for process in list(getattr(pool, "_processes", {}).values()):
                        process.terminate()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    return counters, bad, index


def _start_parse_process(parent: int) -> None:
    """A parse process ends with its parent (``_die_with``) and maps its large arrays whole, as its
    parent does under ``dlrm-preprocess`` (``map_large_allocations``)."""
    map_large_allocations()
    _die_with(parent)


def _die_with(parent: int) -> None:
    """A parse process's first act: a thread that ends it once its parent is gone (killed outright,
    the parent cannot stop it, and it would live on, blocked on a pipe no one reads)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="dlrm-preprocess-parent-watch", daemon=True).start()


def _fit(
    counters: list[SpilledCounter], min_count: int, budget: MemoryBudget, folder: Path, progress: bool
) -> Iterator[Vocabulary | SpilledVocabulary]:
    """The vocabularies, in ``CAT_COLUMNS`` order: side by side when every count fit in memory; else one
    feature at a time, each merged a piece of its spilled counts at a time (``spilled_counts``) and
    ranked on disk (``spilled_vocab``): no feature's kept values are whole in memory."""
    spilled = [c for c in counters if c.files]
    if not spilled:
        with ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="dlrm-preprocess-fit") as pool:
            # numpy's sorts release the GIL: the 26 features are ranked side by side
            yield from pool.map(lambda c: c.fit(min_count), counters)
        return
    log.info(
        "out of core: the counts of %d feature(s) outgrew their share of preprocess.memory_gb (%.2f GB: "
        "%d distinct values a feature); %.2f GB of counts spilled to %s, ranked a partition at a time",
        len(spilled), budget.total / GB, budget.values_per_feature,
        sum(c.spilled_bytes for c in counters) / GB, folder,
    )  # fmt: skip
    for c in counters:  # every count to disk: ranking then holds one partition of one feature at a time
        c.spill()
    for j in tqdm(range(len(counters)), desc="rank", unit="feature", disable=not progress):
        counter, counters[j] = counters[j], None  # each feature's counts go once its vocabulary is made
        yield counter.fit(min_count, budget.partition_bytes)
        del counter


def _vocabularies(
    made: Iterator[Vocabulary | SpilledVocabulary], folder: Path, held: HeldLookups, multi: MultiHot | None
) -> Coverage:
    """Each vocabulary as it is made: room made in ``held`` for its lookup, its file written into
    ``folder`` (``cat_N.parquet``), its coverage taken in (a histogram of its counts), then only its
    re-numbering kept (``IdLookup``: about 9 bytes a kept value, not the vocabulary's 16; with bags,
    ``BagLookup``: about 13), into ``held``."""
    folder.mkdir()
    coverage = Coverage()
    for j, (name, vocab) in enumerate(zip(CAT_COLUMNS, made, strict=True)):
        held.reserve(LOOKUP_BYTES * len(vocab))  # a vocabulary ranked on disk makes its lookup first
        write_vocabulary(folder / f"{name}.parquet", vocab)
        coverage.add(name, *vocab.histogram())
        held.add(vocab.lookup() if multi is None else BagLookup.of(vocab, j, multi))
        del vocab
    return coverage


# The rows as parsed: dense values already transformed, categorical values still raw hashes.
_PARSED = pa.schema(
    [("label", pa.int8())]
    + [(c, pa.float32()) for c in INT_COLUMNS]
    + [(c, pa.int64()) for c in CAT_COLUMNS]
    + [("line", pa.int64())]
)


def _parsed_table(chunk) -> pa.Table:
    n = len(chunk.lines)
    label = chunk.label if chunk.label is not None else np.full(n, -1, dtype=np.int8)
    dense = _dense(chunk.ints)
    cols = [pa.array(label)]
    cols += [pa.array(dense[:, j]) for j in range(len(INT_COLUMNS))]
    cols += [pa.array(chunk.cats[:, j]) for j in range(len(CAT_COLUMNS))]
    cols.append(pa.array(chunk.lines))
    return pa.Table.from_arrays(cols, schema=_PARSED)


_TABLED = 1 << 16  # integers below this (~99.7% of Criteo's) take their log1p from a table
_LOG1P_TABLE = np.log1p(np.arange(_TABLED, dtype=np.float64)).astype(np.float32)


def _dense(ints: np.ndarray) -> np.ndarray:
    """``log1p(max(x, 0))`` as float32, the same floats as computing each one: small integers looked up
    (the table is np.log1p's own results), larger ones computed."""
    dense = _LOG1P_TABLE[np.clip(ints, 0, _TABLED - 1)]
    large = ints >= _TABLED
    if large.any():
        dense[large] = np.log1p(ints[large]).astype(np.float32)
    return dense


class Coverage:
    """The skew report's curves: the share of train lookups covered by the hottest 1, 2, ... rows, per
    feature and over all tables ("all"), taken in a feature at a time (its counts, hottest first). Kept
    of each curve: the report's points and the plot's few hundred samples; of the union, a histogram of
    the counts (its curve needs no concatenation of every count)."""

    def __init__(self) -> None:
        self.points: dict[str, list[float]] = {}
        self.samples: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # (row share, coverage)
        self._histogram: dict[int, int] = {}  # count -> how many rows of all tables have it

    def add(self, name: str, levels: np.ndarray, rows: np.ndarray) -> None:
        """A feature's train counts as a histogram: ``rows[i]`` ids have count ``levels[i]`` (descending)."""
        self._curve(name, *_top_sums(levels, rows))
        for value, n in zip(levels.tolist(), rows.tolist(), strict=True):
            self._histogram[value] = self._histogram.get(value, 0) + n

    def report(self) -> dict:
        """The union's curve (from the histogram), then the report: ``row_share``, ``features``,
        ``overall``."""
        levels = np.array(sorted(self._histogram, reverse=True), dtype=np.int64)
        rows = np.array([self._histogram[v] for v in levels.tolist()], dtype=np.int64)
        self._curve("all", *_top_sums(levels, rows))
        features = {name: p for name, p in self.points.items() if name != "all"}
        return {"row_share": SKEW_POINTS, "features": features, "overall": self.points["all"]}

    def _curve(self, name: str, n: int, total: int, top) -> None:
        """``top(k)``: the sum of the ``k`` highest of the ``n`` counts (``k``: int64, 1 <= k <= n)."""

        def cov(k: np.ndarray) -> np.ndarray:
            return top(k) / total if total else np.zeros(len(k))

        at = np.array([max(1, int(np.ceil(x * n))) for x in SKEW_POINTS], dtype=np.int64)
        self.points[name] = [float(c) for c in cov(at)] if n else [0.0] * len(SKEW_POINTS)
        if n < 2 or not total:
            self.samples[name] = None
            return
        at = np.unique(np.geomspace(1, n, num=400).astype(np.int64))  # a few hundred points
        self.samples[name] = (at / n, cov(at))


def _top_sums(levels: np.ndarray, rows: np.ndarray):
    """Of counts given as a histogram (``rows[i]`` of them equal ``levels[i]``, descending): how many,
    their sum, and ``top(k)``, the sum of the ``k`` highest (``k``: int64, 1 <= k <= how many)."""
    rows_to = np.cumsum(rows)  # counts down to each level, highest first
    sum_to = np.cumsum(levels * rows)

    def top(k: np.ndarray) -> np.ndarray:
        i = np.searchsorted(rows_to, k, side="left")
        return sum_to[i] - (rows_to[i] - k) * levels[i]

    return (int(rows_to[-1]), int(sum_to[-1]), top) if len(rows) else (0, 0, top)


def _write_skew(folder: Path, skew: dict, samples: dict[str, tuple[np.ndarray, np.ndarray] | None]) -> None:
    # Matplotlib's object interface, not pyplot: no global figure state, and about half a second less
    # of imports and layout (tight_layout) on every run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    folder.mkdir()
    (folder / "skew.json").write_text(json.dumps(skew, indent=2))
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, 0.11, 0.88, 0.85))
    for i, (name, sample) in enumerate(samples.items()):
        if sample is None:
            continue
        if name == "all":
            style = {"color": "k", "lw": 2}
        else:  # 26 features, 10 colours: the line style tells apart features of one colour
            style = {"color": f"C{i % 10}", "ls": ("-", "--", ":")[i // 10], "lw": 0.8, "alpha": 0.7}
        ax.plot(*sample, label=name, **style)
    ax.set_xscale("log")
    # Shares as percentages (0.1%, 1%, ...): what cache.ratio reads as, and no mathtext to lay out
    # (the log axis's default 10^k labels cost ~0.06 s).
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:.10g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.10g}%"))
    ax.set_xlabel("hottest share of rows (cache.ratio)")
    ax.set_ylabel("share of train lookups covered")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.savefig(folder / "skew.png", dpi=100)


class _progress:
    """A tqdm bar in input bytes (MB/s) over several files."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=f"dlrm-preprocess {desc}", disable=not enabled
        )
        self.done_files = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def at(self, path: Path):
        base = self.done_files
        self.done_files += path.stat().st_size

        def update(pos: int) -> None:
            self.bar.update(base + pos - self.bar.n)

        return update
